"""Importing transformers MarianMT models: a folder in OPUS-MT's layout (its own
SentencePiece models and special ids, the decoder starting from <pad>) decodes,
fine-tunes and exports here as in transformers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from tests.conftest import SRC, TGT, TOY
from transformer.checkpoint import CheckpointError, load_checkpoint
from transformer.cli.evaluate import eval_main
from transformer.cli.translate import translate_main
from transformer.config import BOS_ID, PAD_ID, DecodingConfig, load_config
from transformer.data import pad_sources
from transformer.inference import load_model, translate
from transformer.search import decode_corpus
from transformer.training import Trainer
from transformer.training.validation import evaluate_loss

transformers = pytest.importorskip(
    "transformers", reason="transformers not installed: pip install -e '.[hf]'"
)

CPU = torch.device("cpu")
LIMIT = 40
# the architecture of the MarianMT model below, as our config spells it
ARCHITECTURE = [
    "model.d_model=32", "model.n_heads=4", "model.encoder_layers=2",
    "model.decoder_layers=2", "model.d_ff=64", "model.activation=silu",
    "model.norm_first=false", "model.final_logits_bias=true",
    "model.max_positions=128",
]  # fmt: skip


# out of the fast lane (-m 'not slow'): MarianMT models built and converted (about 8 s)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _train_spm(lines: list[str], size: int) -> bytes:
    """A SentencePiece model with SentencePiece's own special ids (unk 0, bos 1,
    eos 2), as OPUS-MT's are."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=size,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


UPDATES = 300


def head(sentence: str, words: int) -> str:
    """The first words of a toy sentence: short pairs, learned in a few hundred
    updates, whose translations end at different lengths."""
    return " ".join(sentence.split()[:words])


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory) -> Path:
    """A MarianMT model built here from a MarianConfig in OPUS-MT's layout:
    source and target SentencePiece models over one vocab.json whose </s> is 0,
    <unk> 1 and <pad> the last id, from which the decoder starts; swish, a
    non-zero final_logits_bias. Random weights, then ``UPDATES`` updates on the
    first words of the toy corpus, so that outputs follow the input and end at
    different lengths."""
    out = tmp_path_factory.mktemp("marian") / "opus-mt-de-en"
    out.mkdir()
    protos = {"source.spm": _train_spm(SRC, 100), "target.spm": _train_spm(TGT, 80)}
    pieces: list[str] = []
    for name, proto in protos.items():
        (out / name).write_bytes(proto)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        for i in range(sp.vocab_size()):
            piece = sp.id_to_piece(i)
            if sp.is_unknown(i) or sp.is_control(i) or piece in pieces:
                continue
            pieces.append(piece)
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    vocab["<pad>"] = pad = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    config = transformers.MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, activation_function="swish", max_position_embeddings=128,
        scale_embedding=True, pad_token_id=pad, eos_token_id=0,
        decoder_start_token_id=pad, forced_eos_token_id=0, dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config)
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.5)
    tokenizer = transformers.MarianTokenizer(
        str(out / "source.spm"), str(out / "target.spm"), str(out / "vocab.json"),
        source_lang="de", target_lang="en",
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(UPDATES):
        rows = torch.randint(0, len(SRC), (32,), generator=g).tolist()
        words = torch.randint(1, 5, (32,), generator=g).tolist()
        batch = tokenizer(
            [head(SRC[i], n) for i, n in zip(rows, words, strict=True)],
            text_target=[head(TGT[i], n) for i, n in zip(rows, words, strict=True)],
            return_tensors="pt", padding=True,
        )  # fmt: skip
        batch["labels"][batch["labels"] == pad] = -100
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=pad, pad_token_id=pad, eos_token_id=0,
        forced_eos_token_id=0, bad_words_ids=[[pad]], num_beams=4, max_length=128,
    )  # fmt: skip
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(marian_dir):
    """transformers' model and tokenizer, and ours from the same folder."""
    hf = transformers.MarianMTModel.from_pretrained(marian_dir).eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(marian_dir)
    model, cfg, tokenizer, _ = load_model(marian_dir)
    return hf, hf_tokenizer, model, cfg, tokenizer


def ids_to_ours(hf_tokenizer, tokenizer):
    """Marian id -> our id, by piece (Marian's start token, <pad>, is our <s>)."""
    out = {}
    for piece, i in hf_tokenizer.get_vocab().items():
        out[i] = tokenizer.tgt.piece_to_id(piece)
    out[hf_tokenizer.pad_token_id] = BOS_ID
    return out


ROWS = {3: 1, 40: 2, 77: 3, 101: 4, 150: 4, 222: 3, 260: 2, 299: 4}  # row: words
SENTENCES = [head(SRC[i], n) for i, n in ROWS.items()]
SENTENCES += ["das ist neu", "wörtern satz"]


@pytest.mark.slow
def test_the_import_holds_the_marian_model(pair):
    hf, hf_tokenizer, model, cfg, tokenizer = pair
    m = cfg.model
    assert (m.activation, m.norm_first, m.final_logits_bias) == ("silu", False, True)
    # one row more: Marian starts from <pad>, our <pad> is a row of its own
    assert m.src_vocab_size == m.tgt_vocab_size == hf.config.vocab_size + 1
    assert (cfg.data.src_lang, cfg.data.tgt_lang) == ("de", "en")
    assert (cfg.decoding.strategy, cfg.decoding.beam_size) == ("beam", 4)
    # the tokenizer: MarianTokenizer's ids, reordered as the vocabulary is
    to_ours = ids_to_ours(hf_tokenizer, tokenizer)
    theirs = hf_tokenizer(SENTENCES)["input_ids"]
    assert [[to_ours[i] for i in row[:-1]] for row in theirs] == tokenizer.encode_src(
        SENTENCES
    )
    assert not tokenizer.joint and tokenizer.shared_vocabulary


def test_teacher_forced_log_probabilities_agree(pair):
    hf, hf_tokenizer, model, _, tokenizer = pair
    to_ours = ids_to_ours(hf_tokenizer, tokenizer)
    batch = hf_tokenizer(SENTENCES, text_target=SENTENCES[::-1], return_tensors="pt",
                         padding=True)  # fmt: skip
    start = hf.config.decoder_start_token_id
    labels = batch.pop("labels")
    tgt_in = torch.cat([torch.full((len(SENTENCES), 1), start), labels[:, :-1]], 1)
    with torch.no_grad():
        theirs = hf(**batch, decoder_input_ids=tgt_in).logits.log_softmax(-1)
    src = pad_sources(tokenizer.encode_src(SENTENCES))
    ours_in = tgt_in.clone().apply_(lambda i: to_ours[i])
    ours_in[:, 1:][labels[:, :-1] == hf_tokenizer.pad_token_id] = PAD_ID
    with torch.no_grad():
        ours = model(src, ours_in).log_softmax(-1)
    order = torch.tensor([to_ours[i] for i in range(hf.config.vocab_size)])
    real = labels != hf_tokenizer.pad_token_id
    torch.testing.assert_close(ours[..., order][real], theirs[real], atol=1e-4, rtol=0)
    # the extra <pad> row takes no probability
    assert ours[..., PAD_ID].exp().max() < 1e-30


def marian_generate(pair, **options) -> list[list[int]]:
    """transformers' hypotheses for SENTENCES in our ids, without </s>."""
    hf, hf_tokenizer, _, _, tokenizer = pair
    to_ours = ids_to_ours(hf_tokenizer, tokenizer)
    batch = hf_tokenizer(SENTENCES, return_tensors="pt", padding=True)
    out = hf.generate(**batch, max_length=LIMIT + 1, **options)
    hyps = []
    for row in out.tolist():
        row = [to_ours[i] for i in row[1:]]
        hyps.append(row[: row.index(3)] if 3 in row else row)
    return hyps


def test_greedy_search_decodes_as_transformers(pair):
    _, _, model, _, tokenizer = pair
    cfg = DecodingConfig(strategy="greedy", max_len_a=0, max_len_b=LIMIT)
    ours = decode_corpus(model, tokenizer.encode_src(SENTENCES), cfg, CPU)
    ours = [h[0].tokens for h in ours]
    assert marian_generate(pair, num_beams=1, do_sample=False) == ours
    assert len({len(t) for t in ours}) >= 3  # outputs end at different lengths
    assert sum(len(t) < LIMIT - 1 for t in ours) >= 8


def test_beam_search_decodes_as_transformers(pair):
    """Beam 5, no length penalty; where the best hypothesis ran to the limit, the
    forced </s> scores differently (0 there, its log-probability here)."""
    _, _, model, _, tokenizer = pair
    cfg = DecodingConfig(
        strategy="beam", beam_size=5, length_penalty=0.0, max_len_a=0, max_len_b=LIMIT
    )
    ours = decode_corpus(model, tokenizer.encode_src(SENTENCES), cfg, CPU)
    ours = [h[0].tokens for h in ours]
    theirs = marian_generate(pair, num_beams=5, length_penalty=0.0, early_stopping=True)
    ended = [(a, b) for a, b in zip(ours, theirs, strict=True)
             if max(len(a), len(b)) < LIMIT - 1]  # fmt: skip
    assert len(ended) >= 8
    assert all(a == b for a, b in ended)


def test_text_translations_are_transformers(pair):
    hf, hf_tokenizer, model, _, tokenizer = pair
    cfg = DecodingConfig(strategy="greedy", max_len_a=0, max_len_b=LIMIT)
    ours = translate(model, tokenizer, SENTENCES, cfg, CPU)
    batch = hf_tokenizer(SENTENCES, return_tensors="pt", padding=True)
    out = hf.generate(**batch, max_length=LIMIT + 1, num_beams=1)
    theirs = hf_tokenizer.batch_decode(out, skip_special_tokens=True)
    assert [t[0].text.strip() for t in ours] == theirs
    assert len(set(theirs)) >= 4  # as long as the sources


def test_the_commands_take_the_folder(marian_dir, tmp_path, capsys):
    assert translate_main(["--checkpoint", str(marian_dir), "-s", SRC[3]]) == 0
    assert capsys.readouterr().out.strip()
    src, ref = tmp_path / "src.de", tmp_path / "ref.en"
    src.write_text("\n".join(SRC[:20]) + "\n")
    ref.write_text("\n".join(TGT[:20]) + "\n")
    args = ["--checkpoint", str(marian_dir), "--src", str(src), "--ref", str(ref)]
    out = tmp_path / "hyp.txt"
    assert eval_main([*args, "--greedy", "--output", str(out)]) == 0
    assert "BLEU" in capsys.readouterr().out
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["checkpoint"] == str(marian_dir)
    # the server's loader (one model per direction) reads it too
    from transformer.serve.models import load_models

    (loaded,) = load_models([marian_dir], CPU)
    assert (loaded.source, loaded.target) == ("de", "en")


def test_fine_tuning_from_the_folder_lowers_the_loss(marian_dir, corpus_dir, tmp_path):
    """training.init_from names the folder: the run starts from its weights and
    tokenizer and learns the toy corpus further."""
    cfg = load_config(
        TOY,
        [
            f"training.run_dir={tmp_path / 'run'}", f"data.dir={corpus_dir}",
            "data.format=text", "data.src_lang=de", "data.tgt_lang=en",
            "data.valid_split=val", "data.max_tokens=512", *ARCHITECTURE,
            f"training.init_from={marian_dir}", "training.max_steps=30",
            "training.lr=0.003", "training.warmup_steps=5", "training.valid_bleu=false",
            "training.best_metric=loss", "training.validate_every=1000",
            "training.threads=1", "training.label_smoothing=0.1",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg)
    imported = load_model(marian_dir)[0].state_dict()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, imported[name]), name
    before = evaluate_loss(trainer.model, trainer.valid[0].corpus, 512, CPU, "fp32")[
        "loss"
    ]
    trainer.train()
    after = evaluate_loss(trainer.model, trainer.valid[0].corpus, 512, CPU, "fp32")[
        "loss"
    ]
    assert after < 0.9 * before, (before, after)
    # the fixed logits bias stays as imported
    assert torch.equal(trainer.model.final_logits_bias, imported["final_logits_bias"])
    # and the result exports to CTranslate2 int8 like any checkpoint of ours
    pytest.importorskip("ctranslate2", reason="the export extra")
    from transformer.export import ExportedModel, export_checkpoint

    last = tmp_path / "run" / "last.pt"
    out = export_checkpoint(last, tmp_path / "int8", quantization="int8")
    tuned = load_model(last)[0]
    greedy = DecodingConfig(strategy="greedy", max_len_a=0, max_len_b=LIMIT)
    srcs = trainer.tokenizer.encode_src(SENTENCES)
    ours = [h[0].tokens for h in decode_corpus(tuned, srcs, greedy, CPU)]
    int8 = ExportedModel(out, intra_threads=1).decode(srcs, greedy)
    assert sum(a[0].tokens == b for a, b in zip(int8, ours, strict=True)) >= 5


def test_the_ctranslate2_export_decodes_as_the_import(pair, tmp_path):
    pytest.importorskip("ctranslate2", reason="the export extra")
    from transformer.export import ExportedModel, export_model

    _, _, model, cfg, tokenizer = pair
    out = export_model(model, tokenizer, tmp_path / "ct2", decoding=cfg.decoding)
    exported = ExportedModel(out, intra_threads=1)
    greedy = DecodingConfig(strategy="greedy", max_len_a=0, max_len_b=LIMIT)
    srcs = tokenizer.encode_src(SENTENCES)
    ours = [h[0].tokens for h in decode_corpus(model, srcs, greedy, CPU)]
    assert [h[0].tokens for h in exported.decode(srcs, greedy)] == ours
    texts = [t[0].text for t in exported.translate(SENTENCES, greedy)]
    assert texts == [t[0].text for t in translate(model, tokenizer, SENTENCES,
                                                    greedy, CPU)]  # fmt: skip
    # int8, as published models are exported: it loads and translates
    small = export_model(model, tokenizer, tmp_path / "int8", quantization="int8")
    int8 = ExportedModel(small, intra_threads=1).translate(SENTENCES, greedy)
    assert sum(a[0].tokens == b for a, b in zip(int8, ours, strict=True)) >= 5


def test_an_exported_import_is_the_same_marian_model(pair, marian_dir, tmp_path):
    """MarianMT -> ours -> MarianMT (``transformer-export --format hf``): the
    new folder generates what the original does."""
    from transformer.export import main

    out = tmp_path / "again"
    assert main(["--checkpoint", str(marian_dir), "--output", str(out),
                 "--format", "hf"]) == 0  # fmt: skip
    again = transformers.MarianMTModel.from_pretrained(out).eval()
    again_tok = transformers.MarianTokenizer.from_pretrained(out)
    batch = again_tok(SENTENCES, return_tensors="pt", padding=True)
    texts = again_tok.batch_decode(
        again.generate(**batch, num_beams=1, max_length=LIMIT + 1),
        skip_special_tokens=True,
    )
    hf, hf_tokenizer = pair[0], pair[1]
    batch = hf_tokenizer(SENTENCES, return_tensors="pt", padding=True)
    original = hf_tokenizer.batch_decode(
        hf.generate(**batch, num_beams=1, max_length=LIMIT + 1),
        skip_special_tokens=True,
    )
    assert texts == original


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if " INFO " not in line]  # fmt: skip
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_folder_that_is_no_marian_model_is_one_line(tmp_path, marian_dir, capsys):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert translate_main(["--checkpoint", str(other), "-s", "x"]) == 2
    assert "not a MarianMT model (config.json has model_type 'bert')" in error_line(
        capsys
    )
    broken = tmp_path / "no-spm"
    broken.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.json"):
        (broken / name).write_bytes((marian_dir / name).read_bytes())
    assert translate_main(["--checkpoint", str(broken), "-s", "x"]) == 2
    assert "no source.spm, target.spm" in error_line(capsys)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert translate_main(["--checkpoint", str(plain), "-s", "x"]) == 2
    assert "is a folder, not a checkpoint file" in error_line(capsys)
    refused = tmp_path / "unscaled"
    refused.mkdir()
    for path in marian_dir.iterdir():
        (refused / path.name).write_bytes(path.read_bytes())
    config = json.loads((marian_dir / "config.json").read_text())
    (refused / "config.json").write_text(json.dumps({**config, "scale_embedding": 0}))
    with pytest.raises(CheckpointError, match="scale_embedding: false"):
        load_checkpoint(refused)


def test_a_hub_name_is_read_from_the_hub_cache(monkeypatch, marian_dir, tmp_path):
    """What the Hub client hands back (here: the folder, never the network) is
    read as the folder is; eval writes its hypotheses to the working folder."""
    import transformer.hf.importing as importing

    asked = []
    monkeypatch.setattr(importing, "download", lambda n: asked.append(n) or marian_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src.de").write_text(SRC[3] + "\n")
    (tmp_path / "ref.en").write_text(TGT[3] + "\n")
    name = "Helsinki-NLP/opus-mt-de-en"
    args = ["--checkpoint", name, "--src", "src.de", "--ref", "ref.en", "--greedy"]
    assert eval_main(args) == 0
    assert asked == [name]
    report = json.loads((tmp_path / "opus-mt-de-en.src.de.hyp.json").read_text())
    assert report["checkpoint"] == name
    assert load_checkpoint(name)["imported_from"] == name


def test_a_hub_name_goes_to_the_hub_client(monkeypatch, tmp_path, capsys):
    """A name that is no file or folder is asked of the Hub (never here: the
    client is replaced), and its failure is one line."""
    import huggingface_hub

    asked = []

    def offline(name, **options):
        asked.append(name)
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    assert (
        translate_main(["--checkpoint", "Helsinki-NLP/opus-mt-xx-yy", "-s", "a"]) == 2
    )
    assert asked == ["Helsinki-NLP/opus-mt-xx-yy"]
    line = error_line(capsys)
    assert "not a Hugging Face Hub model that could be downloaded here" in line
    assert "offline mode is enabled" in line
    # a missing file of ours is never taken for a Hub name
    assert translate_main(["--checkpoint", "runs/best.pt", "-s", "a"]) == 2
    assert "runs/best.pt: checkpoint not found" in error_line(capsys)
    assert asked == ["Helsinki-NLP/opus-mt-xx-yy"]
    with pytest.raises(CheckpointError, match="training.init_from: .*Hub"):
        from transformer.training.finetune import load_init

        cfg = load_config(TOY, ["training.init_from=Helsinki-NLP/opus-mt-xx-yy"])
        load_init(cfg)


def test_data_tokenizer_vocab_takes_a_marian_vocabulary(marian_dir):
    """A new model can be trained with MarianMT's tokenizer files: its
    vocab.json gives the pieces' ids (ours first: <pad> <unk> <s> </s>) over the
    two SentencePiece models, which share the one vocabulary."""
    from transformer.config import ConfigError, config_from_dict
    from transformer.tokenizer import Tokenizer

    tokenizer_cfg = {
        "joint": False,
        "src_model": str(marian_dir / "source.spm"),
        "tgt_model": str(marian_dir / "target.spm"),
        "vocab": str(marian_dir / "vocab.json"),
    }
    cfg = config_from_dict({"data": {"tokenizer": tokenizer_cfg}})  # ties: allowed
    tokenizer = Tokenizer.from_files(cfg.data.tokenizer)
    marian = json.loads((marian_dir / "vocab.json").read_text())
    assert tokenizer.vocab[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tokenizer.src_vocab_size == len(marian) + 1  # <s> is new
    assert tokenizer.shared_vocabulary and not tokenizer.joint
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(marian_dir)
    pieces = [hf_tokenizer.convert_ids_to_tokens(row[:-1])
              for row in hf_tokenizer(SENTENCES)["input_ids"]]  # fmt: skip
    assert [[tokenizer.vocab[i] for i in row] for row in
            tokenizer.encode_src(SENTENCES)] == pieces  # fmt: skip
    with pytest.raises(ConfigError, match="data.tokenizer.vocab: gives the ids"):
        config_from_dict({"data": {"tokenizer": {"vocab": "v.json"}}})

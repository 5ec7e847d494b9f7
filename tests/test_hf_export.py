"""transformers export (``transformer-export --format hf``): the MarianMT folder
holds our model exactly, and transformers decodes with it as we do."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, toy_text, train_copy_model
from transformer.checkpoint import atomic_save
from transformer.config import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    Config,
    DataConfig,
    DecodingConfig,
    TokenizerConfig,
    model_config,
)
from transformer.data import pad_sources
from transformer.export import ExportError, main
from transformer.hf.exporting import export_hf, transformers_major
from transformer.inference import load_model, translate
from transformer.models import Transformer
from transformer.search import decode_corpus
from transformer.tokenizer import Tokenizer

transformers = pytest.importorskip(
    "transformers", reason="transformers not installed: pip install -e '.[hf]'"
)

CPU = torch.device("cpu")
# every configuration MarianMT and ours share: tied and untied output layers,
# shared and separate embeddings, one vocabulary and two, every activation
VARIANTS = {
    "all tied, joint": dict(),
    "untied output, silu, logits bias": dict(
        tie_output_embeddings=False, activation="silu", final_logits_bias=True
    ),
    "separate embeddings over one vocabulary, gelu": dict(
        tie_src_tgt_embeddings=False, activation="gelu"
    ),
    "separate vocabularies, untied output": dict(
        tie_src_tgt_embeddings=False, tie_output_embeddings=False
    ),
}
LIMIT = 20  # one length limit for every sentence, as transformers has


# out of the fast lane (-m 'not slow'): MarianMT exports of toy models (~8 s)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@dataclass
class Exported:
    model: Transformer
    tokenizer: Tokenizer
    config: Config
    dir: Path
    hf: object  # MarianMTModel
    hf_tokenizer: object  # MarianTokenizer


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    """A joint model, and separate ones whose target side has fewer letters."""
    src, tgt = toy_text("copy", "train"), toy_text("reverse", "train", letters=10)
    return {
        "joint": Tokenizer.train(TokenizerConfig(vocab_size=40), src, []),
        "separate": Tokenizer.train(
            TokenizerConfig(vocab_size=40, joint=False), src, tgt
        ),
    }


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tokenizers, tmp_path_factory) -> Exported:
    """A partly trained copy model (outputs that follow the input and end at
    different lengths, with choices left for beam search) and its export."""
    tokenizer = tokenizers["separate" if "separate voc" in request.param else "joint"]
    model = train_copy_model(
        60,
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
        **VARIANTS[request.param],
    )
    if model.final_logits_bias is not None:
        torch.manual_seed(3)
        model.final_logits_bias.normal_(0.0, 0.5)
    config = Config(
        data=DataConfig(src_lang="xx", tgt_lang="yy"),
        model=model.cfg,
        decoding=DecodingConfig(beam_size=4, length_penalty=0.0),
    )
    out = tmp_path_factory.mktemp("hf") / "m"
    sizes = tokenizer.src_vocab_size, tokenizer.tgt_vocab_size
    if sizes[0] != sizes[1] and transformers_major() < 5:
        with pytest.raises(ExportError, match="export with transformers 5"):
            export_hf(model, tokenizer, config, out)
        pytest.skip(f"transformers {transformers.__version__} cannot hold it")
    export_hf(model, tokenizer, config, out)
    hf = transformers.MarianMTModel.from_pretrained(out).eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(out)
    return Exported(model, tokenizer, config, out, hf, hf_tokenizer)


def sources(tokenizer: Tokenizer) -> list[list[int]]:
    """Source ids of 1 to 9 pieces (the model was trained on 3 to 8), unseen."""
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(4, tokenizer.src_vocab_size, (n,), generator=g).tolist()
        for n in (3, 7, 1, 8, 5, 9, 6, 4, 2, 5)
    ]


def generate(exported: Exported, srcs: list[list[int]], **options) -> list[list[int]]:
    """transformers' ``generate`` on our source ids (with </s>, padded): the
    tokens after the decoder start, up to </s>."""
    batch = pad_sources(srcs)
    out = exported.hf.generate(
        input_ids=batch, attention_mask=batch != PAD_ID, max_length=LIMIT + 1,
        **options,
    )  # fmt: skip
    hyps = []
    for row in out.tolist():
        assert row[0] == BOS_ID  # the decoder start of generation_config.json
        row = row[1:]
        hyps.append(row[: row.index(EOS_ID)] if EOS_ID in row else row)
    return hyps


@pytest.mark.slow
def test_the_round_trip_gives_back_the_same_model(exported):
    """ours -> MarianMT -> ours (``load_checkpoint`` of the folder): the same
    weights bit for bit, the same architecture, data and decoding settings, a
    tokenizer that encodes and decodes alike."""
    model, cfg, tokenizer, _ = load_model(exported.dir)
    back, original = model.state_dict(), exported.model.state_dict()
    assert back.keys() == original.keys()
    for name, value in original.items():
        assert torch.equal(back[name], value), name
    assert asdict(cfg.model) == asdict(exported.model.cfg)
    assert cfg.data.src_lang == "xx" and cfg.decoding == exported.config.decoding
    texts = toy_text("copy", "val")
    unseen = ["unseen ÄÖ text"]  # pieces the models lack: <unk>
    assert tokenizer.encode_src(texts + unseen) == exported.tokenizer.encode_src(
        texts + unseen
    )
    assert tokenizer.encode_tgt(texts + unseen) == exported.tokenizer.encode_tgt(
        texts + unseen
    )
    ids = exported.tokenizer.encode_tgt(texts)
    assert [tokenizer.decode_tgt(i) for i in ids] == [
        exported.tokenizer.decode_tgt(i) for i in ids
    ]


def test_marian_tokenizer_encodes_as_ours(exported):
    texts = toy_text("copy", "val")
    theirs = exported.hf_tokenizer(texts)["input_ids"]
    assert theirs == [[*s, EOS_ID] for s in exported.tokenizer.encode_src(texts)]
    targets = exported.hf_tokenizer(text_target=texts)["input_ids"]
    assert targets == [[*t, EOS_ID] for t in exported.tokenizer.encode_tgt(texts)]


def test_teacher_forced_log_probabilities_agree(exported):
    srcs = sources(exported.tokenizer)
    vocab = exported.tokenizer.tgt_vocab_size
    tgts = [[4 + (i * 7 + j) % (vocab - 4) for j in range(len(s) + 2)]
            for i, s in enumerate(srcs)]  # fmt: skip
    src = pad_sources(srcs)
    tgt_in = pad_sources([[BOS_ID, *t] for t in tgts])[:, :-1]  # no </s> needed
    with torch.no_grad():
        ours = torch.log_softmax(exported.model(src, tgt_in), -1)
        theirs = exported.hf(
            input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=tgt_in
        ).logits.log_softmax(-1)
    real = tgt_in != PAD_ID
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-4, rtol=0)


def test_greedy_generate_equals_our_greedy_search(exported):
    srcs = sources(exported.tokenizer)
    cfg = DecodingConfig(strategy="greedy", max_len_a=0, max_len_b=LIMIT)
    ours = [h[0].tokens for h in decode_corpus(exported.model, srcs, cfg, CPU)]
    assert generate(exported, srcs, num_beams=1, do_sample=False) == ours
    # not trivially: outputs of several lengths, most ended by </s>
    assert len({len(t) for t in ours}) >= 3
    assert sum(len(t) < LIMIT - 1 for t in ours) >= 7


def test_beam_search_best_hypotheses_equal_ours(exported):
    """Beam 5, no length penalty on either side. transformers scores the </s> it
    forces at the limit 0, ours its log-probability: compare the sentences whose
    best hypothesis ended before the limit on both sides (most of them)."""
    srcs = sources(exported.tokenizer)
    cfg = DecodingConfig(
        strategy="beam", beam_size=5, length_penalty=0.0, max_len_a=0, max_len_b=LIMIT
    )
    ours = [h[0].tokens for h in decode_corpus(exported.model, srcs, cfg, CPU)]
    theirs = generate(
        exported, srcs, num_beams=5, length_penalty=0.0, early_stopping=True
    )
    ended = [
        (a, b)
        for a, b in zip(ours, theirs, strict=True)
        if max(len(a), len(b)) < LIMIT - 1
    ]
    assert len(ended) >= 7
    for a, b in ended:
        assert a == b
    greedy = DecodingConfig(strategy="greedy", max_len_a=0, max_len_b=LIMIT)
    plain = [h[0].tokens for h in decode_corpus(exported.model, srcs, greedy, CPU)]
    assert ours != plain  # the beam mattered


def transformers_translate(folder: Path, sentences: list[str]) -> list[str]:
    """``pipeline("translation")`` where transformers has it (before version 5,
    which removed it); otherwise what it did: tokenize, generate, decode."""
    if transformers_major() < 5:
        pipe = transformers.pipeline("translation", model=str(folder))
        return [out["translation_text"] for out in pipe(sentences, num_beams=1)]
    tok = transformers.MarianTokenizer.from_pretrained(folder)
    model = transformers.MarianMTModel.from_pretrained(folder).eval()
    batch = tok(sentences, return_tensors="pt", padding=True)
    out = model.generate(**batch, num_beams=1)
    return tok.batch_decode(out, skip_special_tokens=True)


def test_text_in_text_out_as_ours(exported):
    """Raw sentences through transformers' tokenizer, generation and
    detokenization (the generation config's limit): our greedy translations
    (which keep the spaces of word-start pieces at the ends; transformers strips
    them)."""
    sentences = toy_text("copy", "val")
    cfg = DecodingConfig(strategy="greedy", max_len_a=0, max_len_b=48)
    ours = translate(exported.model, exported.tokenizer, sentences, cfg, CPU)
    theirs = transformers_translate(exported.dir, sentences)
    assert theirs == [t[0].text.strip() for t in ours]
    assert len({t[0].text for t in ours}) > 1


def test_generation_config_holds_our_defaults(exported):
    gen = json.loads((exported.dir / "generation_config.json").read_text())
    assert gen["decoder_start_token_id"] == BOS_ID
    assert gen["forced_eos_token_id"] == EOS_ID
    assert gen["bad_words_ids"] == [[PAD_ID], [BOS_ID]]
    assert (gen["num_beams"], gen["early_stopping"]) == (4, True)
    assert gen["max_length"] == exported.model.cfg.max_positions + 1
    card = (exported.dir / "README.md").read_text()
    assert "transformer-train --config transformer-nmt.yaml" in card
    assert (exported.dir / "transformer-nmt.yaml").is_file()


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        (dict(norm_first=True), "model.norm_first: true"),
        (dict(positional="learned"), "model.positional: learned"),
    ],
)
def test_refusals_name_the_option_and_the_ways_on(tokenizers, tmp_path, overrides,
                                                  option):  # fmt: skip
    tokenizer = tokenizers["joint"]
    sizes = dict(
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
    )
    model = train_copy_model(0, **sizes, **overrides)
    with pytest.raises(ExportError) as error:
        export_hf(model, tokenizer, Config(model=model.cfg), tmp_path / "x")
    message = str(error.value)
    assert option in message and "CTranslate2" in message
    assert "configs/multi30k_de_en_marian.yaml" in message
    assert (Path(__file__).parents[1] / "configs/multi30k_de_en_marian.yaml").is_file()
    assert not (tmp_path / "x").exists()
    cfg = Config(model=model.cfg, data=DataConfig(pairs=["de-en", "en-de"]))
    with pytest.raises(ExportError, match="data.pairs"):
        export_hf(model, tokenizer, cfg, tmp_path / "x")
    rnn = Config(model=model_config(arch="rnn"))
    with pytest.raises(ExportError, match="model.arch: rnn: MarianMT is the"):
        export_hf(model, tokenizer, rnn, tmp_path / "x")


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "INFO" not in line]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_writes_the_card_with_the_results_of_its_checkpoint(
    tokenizers, tmp_path, capsys
):
    tokenizer = tokenizers["joint"]
    model = train_copy_model(20, src_vocab_size=tokenizer.src_vocab_size,
                             tgt_vocab_size=tokenizer.tgt_vocab_size)  # fmt: skip
    config = Config(model=model.cfg)
    checkpoint = tmp_path / "m.pt"
    atomic_save(
        {
            "format": 2, "model": model.state_dict(), "config": config.to_dict(),
            "tokenizer": tokenizer.state_dict(), "step": 20,
        },
        checkpoint,
    )  # fmt: skip
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    scores = {
        "bleu": 12.345, "chrf": 45.678, "bleu_lc": 13.5,
        "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2",
        "chrf_signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2",
        "bleu_lc_signature": "nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:2",
    }  # fmt: skip
    command = f"transformer-eval --checkpoint {checkpoint} --split test --beam 5"
    row = {
        "row": "single", "checkpoints": [{"file": str(checkpoint), "sha256": digest}],
        "test_split": "test", "test": scores, "beam": 5, "alpha": 1.0,
        "valid_bleu_chosen": 11.0, "command": command,
    }  # fmt: skip
    other = {**row, "row": "other", "checkpoints": [{"file": "x", "sha256": "0"}]}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": [row, other]}))
    out = tmp_path / "hf"
    args = ["--checkpoint", str(checkpoint), "--output", str(out), "--format", "hf"]
    assert main([*args, "--results", str(results)]) == 0
    card = (out / "README.md").read_text()
    assert "| single | test | 12.35 | 45.68 | 13.50 | 5 | 1.0 |" in card
    assert "other" not in card
    for key in ("bleu_signature", "chrf_signature", "bleu_lc_signature"):
        assert scores[key] in card
    assert command in card
    info = json.loads((out / "export.json").read_text())
    assert (info["format"], info["step"]) == ("transformers-marian", 20)
    capsys.readouterr()
    # an existing export is replaced only with --force; other options refused
    assert main(args) == 2
    assert "already exists; pass --force" in error_line(capsys)
    assert main([*args, "--force", "--quantization", "int8"]) == 2
    assert "--quantization: for CTranslate2 exports only" in error_line(capsys)
    assert main([*args, "--force", "--results"]) == 0
    assert "No scores are recorded" in (out / "README.md").read_text()


PUBLISHED = ROOT / "models" / "multi30k_de_en_marian.safetensors"
GERMAN = [
    "Ein Mann in einem blauen Hemd fährt Fahrrad.",
    "Zwei Hunde spielen im Schnee.",
    "Eine Frau sitzt auf einer Bank und liest ein Buch.",
    "Drei Kinder laufen an einem sonnigen Tag über eine Wiese.",
    "Ein kleines Mädchen mit einem roten Hut lächelt.",
    "Arbeiter reparieren eine Straße in der Stadt.",
]


def test_the_published_exportable_model_translates_in_transformers_as_ours(tmp_path):
    """The Multi30k model published in the MarianMT configuration: its export
    translates German text through transformers' tokenizer, generation and
    detokenization as our greedy search does, and its card quotes its results row
    (results/multi30k_de_en_marian.json)."""
    out = tmp_path / "hf"
    assert (
        main(["--checkpoint", str(PUBLISHED), "--format", "hf", "--output", str(out)])
        == 0
    )
    model, _, tokenizer, _ = load_model(PUBLISHED)
    cfg = DecodingConfig(strategy="greedy", max_len_a=0, max_len_b=100)
    ours = [t[0].text.strip() for t in translate(model, tokenizer, GERMAN, cfg, CPU)]
    assert transformers_translate(out, GERMAN) == ours
    assert sum("dog" in t for t in ours) >= 1 and len(set(ours)) == len(GERMAN)
    results = json.loads((ROOT / "results" / "multi30k_de_en_marian.json").read_text())
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"{results['rows'][0]['test']['bleu']:.2f}" in card

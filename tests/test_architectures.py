"""Every architecture (Transformer, RNN with soft / hard / no attention,
decoder-only) through the same search, training loop and checkpoints; the
attention and masking properties of each."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny, tiny_config, tiny_model, train_copy_model
from transformer.checkpoint import load_checkpoint
from transformer.config import BOS_ID, ConfigError, DecodingConfig
from transformer.inference import load_model
from transformer.models.rnn import Attention
from transformer.search import generate
from transformer.training import Trainer

RNN = dict(arch="rnn", rnn_hidden=32)
ARCHS = {
    "transformer": {},
    "rnn-soft-additive": RNN,
    "rnn-soft-general-gru": {**RNN, "attention_score": "general", "rnn_type": "gru"},
    "rnn-soft-dot": {**RNN, "attention_score": "dot"},
    "rnn-hard": {**RNN, "attention": "hard"},
    "rnn-none": {**RNN, "attention": "none"},
    "decoder_only": dict(arch="decoder_only"),
}
# the toy run's options per architecture: a decoder-only model holds both sides
RUN_OPTIONS = {
    "transformer": [],
    "rnn-soft-additive": ["model.arch=rnn", "model.rnn_hidden=32"],
    "rnn-hard": ["model.arch=rnn", "model.rnn_hidden=32", "model.attention=hard"],
    "rnn-none": ["model.arch=rnn", "model.rnn_hidden=32", "model.attention=none"],
    "decoder_only": ["model.arch=decoder_only", "data.max_length=31"],
}
SRC = torch.tensor([[5, 6, 7, 8, 9, 3], [10, 11, 3, 0, 0, 0], [12, 13, 4, 3, 0, 0]])


def sharp(name: str, seed: int = 0):
    """A random model with peaked outputs, so that hypotheses differ and end."""
    model = tiny_model(seed=seed, **ARCHS[name])
    with torch.no_grad():
        model.tgt_embed.weight.mul_(8.0)
    return model


def tokens(results):
    return [[h.tokens for h in hyps] for hyps in results]


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_cached_decoding_equals_recomputing(name, strategy):
    model = sharp(name)
    cfg = DecodingConfig(
        strategy=strategy, beam_size=4, nbest=2 if strategy == "beam" else 1
    )
    cached = generate(model, SRC, cfg, True, torch.Generator().manual_seed(1))
    again = generate(model, SRC, cfg, False, torch.Generator().manual_seed(1))
    assert tokens(cached) == tokens(again)
    for a, b in zip(cached, again, strict=True):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)
    assert len({len(h[0].tokens) for h in cached}) > 1  # not all at the limit


@pytest.mark.parametrize("name", ARCHS)
def test_beam_one_equals_greedy(name):
    model = sharp(name, seed=3)
    greedy = generate(model, SRC, DecodingConfig(strategy="greedy"))
    beam = generate(
        model, SRC, DecodingConfig(strategy="beam", beam_size=1, length_penalty=0.0)
    )
    assert tokens(greedy) == tokens(beam)
    for g, b in zip(greedy, beam, strict=True):
        assert g[0].score == pytest.approx(b[0].score, abs=1e-4)


# steps, extra settings and exact copies needed (of 16): the fixed-vector model
# has to squeeze the sentence through one state, and learns it last. The
# decoder-only model finds each source token at an offset set by the source
# length; under a constant rate when it gets there varied with the seed and the
# CPU's rounding, and an annealed rate lets every run settle on it
COPY = {
    "rnn-soft-additive": (300, {"rnn_hidden": 128}, 14),
    "rnn-hard": (300, {"rnn_hidden": 128}, 13),
    "rnn-none": (500, {"rnn_hidden": 128}, 8),
    "decoder_only": (400, {"decoder_layers": 4, "lr": 2e-3, "anneal": True}, 12),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", COPY)
def test_toy_copy_task_is_learned(name):
    steps, extra, needed = COPY[name]
    model = train_copy_model(steps, **{**ARCHS[name], **extra})
    g = torch.Generator().manual_seed(5)
    body = torch.randint(4, 14, (16, 6), generator=g)
    src = torch.cat([body, torch.full((16, 1), 3)], 1)
    out = generate(model, src, DecodingConfig(strategy="greedy"))
    exact = sum(h[0].tokens == row.tolist() for h, row in zip(out, body, strict=True))
    assert exact >= needed, exact


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_OPTIONS)
def test_checkpoint_round_trip_and_bit_identical_resume(name, tmp_path, toy_tokenizer):
    extra = [*RUN_OPTIONS[name], "training.validate_every=3"]

    def trainer(run: str, steps: int, resume: bool | None = None) -> Trainer:
        cfg = tiny(tmp_path / run, toy_tokenizer, f"training.max_steps={steps}", *extra)
        return Trainer(cfg, resume)

    straight = trainer("a", 6)
    straight.train()
    trainer("b", 4).train()
    resumed = trainer("b", 6, resume=True)
    assert resumed.step == 4
    resumed.train()
    for (key, a), b in zip(
        straight.model.state_dict().items(),
        resumed.model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), key
    model, cfg, _, _ = load_model(tmp_path / "b" / "last.pt")
    assert type(model) is type(straight.model)
    assert cfg.model.arch == (ARCHS[name].get("arch") or "transformer")
    for key, value in straight.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 6


def test_decoding_compile_is_refused_for_an_rnn_alone_or_in_an_ensemble(
    tmp_path, toy_tokenizer, capsys
):
    from transformer.cli.evaluate import eval_main
    from transformer.cli.translate import translate_main

    runs = {}
    for name in ("transformer", "rnn-soft-additive"):
        cfg = tiny(
            tmp_path / name, toy_tokenizer, "training.max_steps=1", *RUN_OPTIONS[name]
        )
        Trainer(cfg).train()
        runs[name] = str(tmp_path / name / "last.pt")
    rnn, transformer = runs["rnn-soft-additive"], runs["transformer"]
    for checkpoints in ([rnn], [transformer, rnn]):
        args = ["--checkpoint", *checkpoints, "-s", "a", "decoding.compile=true"]
        assert translate_main(args) == 2
        err = capsys.readouterr().err
        assert f"decoding.compile: true is not supported for {rnn}" in err
        assert "Traceback" not in err
    args = ["--checkpoint", rnn, "--split", "val", "decoding.compile=true"]
    assert eval_main(args) == 2
    assert "model.arch: rnn" in capsys.readouterr().err
    pytest.importorskip("ctranslate2", reason="export extra (ctranslate2) missing")
    from transformer.export import main as export_main

    assert export_main(["--checkpoint", rnn, "--output", str(tmp_path / "x")]) == 2
    assert f"{rnn}: model.arch: rnn cannot be exported" in capsys.readouterr().err


# --- RNN attention ---


def rnn_attention(kind: str, score: str = "additive", temperature: float = 1.0):
    torch.manual_seed(0)
    cfg = tiny_config(
        arch="rnn",
        rnn_hidden=16,
        attention=kind,
        attention_score=score,
        gumbel_temperature=temperature,
    )
    return Attention(cfg)


MASK = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])


@pytest.mark.parametrize("score", ["additive", "general", "dot"])
def test_soft_attention_weights_sum_to_one_and_skip_padding(score):
    att = rnn_attention("soft", score)
    states = torch.randn(2, 7, 16)
    query = torch.randn(6, 16)  # 3 decoder rows per sentence (beams)
    att.record_weights = True
    context = att(query, states, att.keys(states), MASK)
    weights = att.weights[0].view(2, 3, 7)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3))
    assert (weights[1, :, 4:] == 0).all()
    assert (weights[1, :, :4] > 0).all()
    expected = (weights @ states).reshape(6, 16)  # the weighted sum of states
    assert torch.allclose(context, expected, atol=1e-6)
    # padding states do not matter at all
    noisy = states.clone()
    noisy[1, 4:] = 100.0
    again = att(query, noisy, att.keys(noisy), MASK)
    assert torch.allclose(again, context, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_hard_attention_selects_exactly_one_real_position(training):
    att = rnn_attention("hard").train(training)
    states = torch.randn(2, 7, 16)
    query = torch.randn(2, 16)
    att.record_weights = True
    for _ in range(50):
        context = att(query, states, att.keys(states), MASK)
    for weights in att.weights:
        assert torch.equal(weights.sum(-1), torch.ones(2))
        assert ((weights == 0) | (weights == 1)).all()
        assert (weights[1, 4:] == 0).all()
    chosen = att.weights[-1].argmax(-1)
    assert torch.allclose(context, states[torch.arange(2), chosen])
    if not training:  # inference takes the most likely position
        scores = att.scores(query, att.keys(states), MASK)
        assert torch.equal(chosen, scores.argmax(-1))


def test_hard_attention_samples_follow_the_weights():
    torch.manual_seed(0)
    att = rnn_attention("hard").train()
    states = torch.randn(1, 7, 16)
    keys = att.keys(states)
    mask = MASK[1:]
    query = torch.randn(1, 16) * 3  # uneven weights
    probs = att.scores(query, keys, mask).softmax(-1)[0].detach()
    n = 20_000
    att.record_weights = True
    with torch.no_grad():
        att(query.expand(n, 16), states, keys, mask)
    counts = att.weights[0].sum(0)
    # each count is Binomial(n, p): within 5 standard deviations
    sd = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 5 * sd + 1).all(), (counts / n, probs)
    assert counts[4:].sum() == 0


@pytest.mark.parametrize("score", ["additive", "general"])
def test_hard_attention_gradients_reach_the_scores(score):
    att = rnn_attention("hard", score, temperature=0.5).train()
    states = torch.randn(2, 7, 16, requires_grad=True)
    query = torch.randn(2, 16, requires_grad=True)
    context = att(query, states, att.keys(states), MASK)
    (context * torch.randn_like(context)).sum().backward()
    scoring = list(att.parameters())  # additive: W_q, W_k, v; general: W
    assert len(scoring) == (4 if score == "additive" else 1)
    for p in [*scoring, query]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_rnn_alignment_plots_soft_and_hard_and_refuses_none():
    src = SRC[:1]
    tgt = torch.tensor([[BOS_ID, 5, 6, 7]])
    for kind in ("soft", "hard"):
        model = tiny_model(**{**RNN, "attention": kind})
        weights = model.alignment(src, tgt)
        assert weights.shape == (1, 4, 6)
        assert torch.allclose(weights.sum(-1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="attention: none"):
        tiny_model(**{**RNN, "attention": "none"}).alignment(src, tgt)


@pytest.mark.parametrize("name", ["rnn-soft-additive", "rnn-hard", "rnn-none"])
def test_rnn_source_padding_changes_nothing(name):
    model = tiny_model(**ARCHS[name])
    tgt = torch.tensor([[BOS_ID, 5, 6, 7]]).expand(3, -1)
    logits = model(SRC, tgt)
    padded = torch.nn.functional.pad(SRC, (0, 4))
    assert torch.allclose(model(padded, tgt), logits, atol=1e-5)
    short = SRC[1:2, :3]  # the second sentence alone, without its padding
    assert torch.allclose(model(short, tgt[:1]), logits[1:2], atol=1e-5)
    with pytest.raises(ValueError, match="no token"):
        model(torch.zeros(1, 3, dtype=torch.long), tgt[:1])


def test_fixed_vector_decoder_sees_only_the_final_state():
    """With attention none, the source reaches the decoder only through the
    encoder's final states: a change to them alone changes every output."""
    model = tiny_model(**{**RNN, "attention": "none"})
    memory = model.encode(SRC)
    tgt = torch.tensor([[BOS_ID, 5, 6]]).expand(3, -1)
    logits = model.decode(tgt, memory)
    other = model.encode(SRC.flip(0))  # other sources in every row
    assert not torch.allclose(model.decode(tgt, other), logits)
    other.init = memory.init  # ... with the first sources' final states
    assert torch.equal(model.decode(tgt, other), logits)


# --- decoder-only ---


def test_decoder_only_target_never_sees_later_targets():
    model = tiny_model(arch="decoder_only")
    tgt = torch.tensor([[BOS_ID, 5, 6, 7, 8]]).expand(3, -1).clone()
    logits = model(SRC, tgt)
    changed = tgt.clone()
    changed[:, 3:] = 9
    again = model(SRC, changed)
    assert torch.allclose(again[:, :3], logits[:, :3], atol=1e-6)
    assert not torch.allclose(again[:, 3:], logits[:, 3:])


def test_decoder_only_source_padding_changes_nothing():
    model = tiny_model(arch="decoder_only")
    tgt = torch.tensor([[BOS_ID, 5, 6, 7]]).expand(3, -1)
    logits = model(SRC, tgt)
    padded = torch.nn.functional.pad(SRC, (0, 4))  # four more pads per row
    assert torch.allclose(model(padded, tgt), logits, atol=1e-5)
    short = SRC[1:2, :3]  # the second sentence alone, without its padding
    assert torch.allclose(model(short, tgt[:1]), logits[1:2], atol=1e-5)
    # and the source matters
    other = SRC.clone()
    other[:, 0] = 20
    assert not torch.allclose(model(other, tgt), logits)


def test_decoder_only_refuses_sequences_longer_than_its_positions():
    model = tiny_model(arch="decoder_only")  # 64 positions for both sides
    src = torch.randint(4, 23, (2, 40))
    tgt = torch.randint(4, 23, (2, 30))
    with pytest.raises(ValueError, match="max_positions=64"):
        model(src, tgt)


def test_decoder_only_stops_at_its_positions():
    model = sharp("decoder_only")
    long_src = torch.randint(4, 23, (1, 60))
    long_src[0, -1] = 3
    out = generate(model, long_src, DecodingConfig(strategy="greedy", max_len_a=2.0))
    assert len(out[0][0].tokens) < 64 - 60


def test_decoder_only_layers_keep_the_state_dict_names_of_older_checkpoints():
    # its layers were a separate CausalLayer with these names; they are the
    # encoder's layer now, and checkpoints written before load as they are
    per_layer = [
        f"{part}.{p}"
        for part in ("self_attn.out_proj", "self_attn.qkv_proj", "ffn.fc1", "ffn.fc2")
        for p in ("weight", "bias")
    ] + [
        f"{res}.norm.{p}" for res in ("attn_res", "ffn_res") for p in ("weight", "bias")
    ]
    older = ["tgt_embed.weight", "src_embed.weight"]
    older += [f"layers.{i}.{name}" for i in range(2) for name in per_layer]
    model = tiny_model(arch="decoder_only")
    assert sorted(model.state_dict()) == sorted(older)
    saved = {name: torch.randn_like(t) for name, t in model.state_dict().items()}
    fresh = tiny_model(seed=1, arch="decoder_only")
    fresh.load_state_dict(saved)  # strict: no name missing or left over
    assert torch.equal(fresh.layers[1].ffn.fc2.weight, saved["layers.1.ffn.fc2.weight"])


def test_config_checks_name_the_keys(tmp_path, toy_tokenizer):
    with pytest.raises(ConfigError, match="data.max_length"):
        tiny(tmp_path, toy_tokenizer, "model.arch=decoder_only")
    with pytest.raises(ConfigError, match="training.compile"):
        tiny(tmp_path, toy_tokenizer, "model.arch=rnn", "training.compile=true")
    with pytest.raises(ConfigError, match="model.attention"):
        tiny(tmp_path, toy_tokenizer, "model.arch=rnn", "model.attention=local")
    with pytest.raises(ConfigError, match="model.rnn_hidden"):
        tiny(tmp_path, toy_tokenizer, "model.arch=rnn", "model.rnn_hidden=33")


def test_max_minutes_stops_validates_and_resumes(tmp_path, toy_tokenizer):
    cfg = tiny(
        tmp_path / "run",
        toy_tokenizer,
        "training.max_steps=1000",
        "training.max_minutes=0.002",  # 0.12 s of updates
        "training.log_every=1",
    )
    trainer = Trainer(cfg)
    trainer.train()
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert 1 <= ckpt["step"] < 1000
    assert ckpt["train_seconds"] >= 0.12
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"type": "valid"' in rows[-1]  # the run ended with a validation
    # a resumed run has spent its budget already: at most one more update
    again = Trainer(cfg, resume=True)
    again.train()
    assert again.step <= ckpt["step"] + 1

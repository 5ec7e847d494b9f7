"""Ensembles: the mean of the models' probabilities, through the unchanged search,
and the command-line tools with several checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny, tiny_model
from transformer.checkpoint import atomic_save, load_checkpoint
from transformer.cli.evaluate import eval_main
from transformer.cli.translate import translate_main
from transformer.config import BOS_ID, DecodingConfig, TokenizerConfig
from transformer.inference import load_ensemble
from transformer.models import Ensemble
from transformer.search import generate
from transformer.tokenizer import Tokenizer
from transformer.training import Trainer

SRC = torch.tensor([[5, 6, 7, 8, 9, 3], [10, 11, 3, 0, 0, 0], [12, 13, 4, 3, 0, 0]])
STRATEGIES = {
    "greedy": DecodingConfig(strategy="greedy"),
    "beam": DecodingConfig(strategy="beam", beam_size=4, nbest=3),
}


def sharp_model(seed: int, **overrides):
    """A random model with peaked outputs, so that hypotheses vary by input."""
    model = tiny_model(seed=seed, **overrides)
    with torch.no_grad():
        model.tgt_embed.weight.mul_(8.0)
    return model


def hyps(results):
    return [[(h.tokens, h.score) for h in sentence] for sentence in results]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_ensemble_of_one_is_the_model(strategy):
    model = sharp_model(0)
    cfg = STRATEGIES[strategy]
    alone = hyps(generate(model, SRC, cfg))
    assert alone == hyps(generate(Ensemble([model]), SRC, cfg))  # scores exactly
    assert len({len(h[0][0]) for h in alone}) > 1  # outputs end at several lengths


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_ensemble_of_two_copies_is_the_model(strategy):
    model = sharp_model(0)
    cfg = STRATEGIES[strategy]
    alone = generate(model, SRC, cfg)
    twice = generate(Ensemble([model, copy.deepcopy(model)]), SRC, cfg)
    for a, b in zip(alone, twice, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        for ha, hb in zip(a, b, strict=True):
            assert hb.score == pytest.approx(ha.score, abs=1e-4)


def test_sampling_from_one_model_or_two_copies_is_the_models():
    """The same random draws pick the same tokens: the ensemble's distribution is
    the model's (exactly for one, to rounding for two copies)."""
    model = sharp_model(0)
    cfg = DecodingConfig(strategy="sample", temperature=1.5)

    def sample(m, seed):
        return generate(m, SRC, cfg, generator=torch.Generator().manual_seed(seed))

    alone = sample(model, 7)
    assert hyps(sample(Ensemble([model]), 7)) == hyps(alone)
    twice = sample(Ensemble([model, copy.deepcopy(model)]), 7)
    for a, b in zip(alone, twice, strict=True):
        assert a[0].tokens == b[0].tokens
        assert b[0].score == pytest.approx(a[0].score, abs=1e-4)
    # not trivially: other draws give other outputs
    assert hyps(sample(model, 8)) != hyps(alone)


def test_step_scores_are_the_log_of_the_mean_probability():
    # different architectures and lengths: only the vocabulary must be shared
    one = sharp_model(1)
    two = sharp_model(2, d_model=48, n_heads=3, decoder_layers=1, max_positions=40)
    ensemble = Ensemble([one, two]).eval()
    assert ensemble.cfg.max_positions == 40 and one.cfg.max_positions == 64
    tgt = torch.tensor([[BOS_ID, 7, 9, 4]]).expand(3, -1)
    got = ensemble.decode(tgt, ensemble.encode(SRC))  # (B, T, V)
    with torch.no_grad():
        probs = [
            torch.softmax(copy.deepcopy(m).double()(SRC, tgt), -1) for m in (one, two)
        ]
    expected = torch.log((probs[0] + probs[1]) / 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # and not trivially: the models disagree, so the mean is neither of them
    assert (probs[0] - probs[1]).abs().max() > 0.1
    # the search's log_softmax leaves it as it is
    torch.testing.assert_close(torch.log_softmax(got, -1), got, atol=1e-5, rtol=1e-6)


def test_cached_steps_equal_the_whole_prefix():
    ensemble = Ensemble([sharp_model(1), sharp_model(3, decoder_layers=1)]).eval()
    tgt = torch.tensor([[BOS_ID, 7, 9, 4, 5]]).expand(3, -1)
    memory = ensemble.encode(SRC)
    whole = ensemble.decode(tgt, memory)
    state = ensemble.new_cache()
    steps = [ensemble.decode(tgt[:, t : t + 1], memory, state) for t in range(5)]
    assert state.length == 5
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_and_uncached_ensemble_search_agree(strategy):
    # the uncached search selects memory rows, the cached one reorders states
    ensemble = Ensemble([sharp_model(1), sharp_model(4, d_ff=32)])
    cfg = STRATEGIES[strategy]
    cached = generate(ensemble, SRC, cfg, use_cache=True)
    uncached = generate(ensemble, SRC, cfg, use_cache=False)
    assert [[h.tokens for h in s] for s in cached] == [
        [h.tokens for h in s] for s in uncached
    ]


def test_sampling_an_ensemble():
    models = [sharp_model(1), sharp_model(5)]
    cfg = DecodingConfig(strategy="sample", temperature=1.5)

    def sample(model, seed):
        generator = torch.Generator().manual_seed(seed)
        return hyps(generate(model, SRC, cfg, generator=generator))

    ensemble = Ensemble(models)
    assert sample(ensemble, 3) == sample(ensemble, 3)
    assert sample(Ensemble(models[:1]), 3) == sample(models[0], 3)
    # top-k 1 samples the ensemble's greedy output
    greedy = hyps(generate(ensemble, SRC, STRATEGIES["greedy"]))
    top1 = DecodingConfig(strategy="sample", top_k=1)
    generator = torch.Generator().manual_seed(0)
    assert hyps(generate(ensemble, SRC, top1, generator=generator)) == greedy


def test_vocabularies_must_match():
    with pytest.raises(ValueError, match="needs one tokenizer"):
        Ensemble([tiny_model(0), tiny_model(1, src_vocab_size=30, tgt_vocab_size=30)])


# --- the command-line tools ---


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, toy_tokenizer):
    """Two toy copy models of different seeds and sizes (one tokenizer)."""
    root = tmp_path_factory.mktemp("ens")
    paths = []
    for name, extra in (
        ("a", ["training.seed=1"]),
        ("b", ["training.seed=2", "model.d_ff=32", "model.encoder_layers=1"]),
    ):
        run = root / name
        cfg = tiny(run, toy_tokenizer, "training.max_steps=40", *extra)
        Trainer(cfg).train()
        paths.append(run / "last.pt")
    return paths


@pytest.mark.slow
def test_translate_and_eval_with_two_checkpoints(two_runs, tmp_path, capsys):
    a, b = map(str, two_runs)
    ensemble, config, tokenizer, infos = load_ensemble([a, b])
    assert isinstance(ensemble, Ensemble) and len(infos) == 2
    from transformer.inference import translate

    sentences = ["a b c", "d e f g h"]
    cfg = dataclasses.replace(config.decoding, strategy="beam", beam_size=3)
    expected = [
        r[0].text
        for r in translate(ensemble, tokenizer, sentences, cfg, torch.device("cpu"))
    ]
    args = ["-s", sentences[0], "-s", sentences[1], "--beam", "3"]
    assert translate_main(["--checkpoint", a, b, *args]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    # the option repeated, and an override right after the checkpoints
    repeated = ["--checkpoint", a, "--checkpoint", b, "decoding.beam_size=3"]
    assert translate_main([*repeated, "-s", sentences[0], "--beam", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == expected[:1]
    report = tmp_path / "report.json"
    args = ["--split", "val", "--greedy", "--report", str(report)]
    assert eval_main(["--checkpoint", a, b, *args]) == 0
    data = json.loads(report.read_text())
    assert [e["checkpoint"] for e in data["ensemble"]] == [a, b]
    assert data["checkpoint"] == a and data["step"] == 40
    assert data["hypotheses"].endswith(".ens2.val.hyp")
    lines = Path(data["hypotheses"]).read_text().splitlines()
    assert len(lines) == data["sentences"]


@pytest.mark.slow
def test_one_checkpoint_is_the_bare_model(two_runs):
    model, _, _, infos = load_ensemble([two_runs[0]])
    assert not isinstance(model, Ensemble)
    assert infos == [{"checkpoint": str(two_runs[0]), "step": 40}]


@pytest.mark.slow
def test_different_tokenizers_are_refused(two_runs, tmp_path, capsys):
    from transformer.config import DataConfig
    from transformer.data import read_pairs

    ckpt = load_checkpoint(two_runs[1])
    pairs = list(read_pairs(DataConfig(format="copy", toy_train_size=300), "train"))
    other = Tokenizer.train(TokenizerConfig(vocab_size=30), [s for s, _ in pairs], [])
    ckpt["tokenizer"] = other.state_dict()
    odd = tmp_path / "other.pt"
    atomic_save(ckpt, odd)
    a = str(two_runs[0])
    assert translate_main(["--checkpoint", a, str(odd), "-s", "a b"]) == 2
    err = capsys.readouterr().err
    assert f"{odd} and {a} have different tokenizers" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_attention_plot_needs_one_checkpoint(two_runs, tmp_path, capsys):
    a, b = map(str, two_runs)
    png = str(tmp_path / "att.png")
    assert translate_main(["--checkpoint", a, b, "-s", "a b", "--attention", png]) == 2
    assert "--attention plots one model" in capsys.readouterr().err

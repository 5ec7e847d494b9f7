"""User options -> ``DecodingConfig``: the rules every front end shares
(``DecodingConfig.with_options``), and ``unk_penalty``, the option added through
them."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model
from transformer.config import BOS_ID, EOS_ID, UNK_ID, ConfigError, DecodingConfig
from transformer.search import generate

SRC = torch.tensor([[5, 6, 7, 8, 9, 3], [10, 11, 3, 0, 0, 0], [12, 13, 4, 3, 0, 0]])


def test_options_keep_the_base_and_infer_the_strategy():
    base = DecodingConfig(strategy="beam", beam_size=5, length_penalty=1.0)
    same = base.with_options({"beam_size": None, "temperature": None})
    assert same == base and same is not base
    assert base.with_options({"beam_size": 1}).strategy == "greedy"
    wide = base.with_options({"beam_size": 8})
    assert (wide.strategy, wide.beam_size, wide.length_penalty) == ("beam", 8, 1.0)
    assert base.with_options({"strategy": "sample", "top_k": 5}).top_k == 5
    assert base.with_options({"beam_size": 7.0}).beam_size == 7  # coerced, as YAML


@pytest.mark.parametrize(
    ("options", "spelling", "message"),
    [
        ({"temperature": 2.0}, {}, "decoding.temperature: for sampling only (add "),
        (
            {"top_k": 3, "beam_size": 4},
            {"top_k": "--top-k {}", "sample": "--sample"},
            "--top-k: for sampling only (add --sample); this decodes with beam",
        ),
        ({"nbest": 0}, {"nbest": "--nbest {}"}, "--nbest 0: must be >= 1"),
        ({"nbest": 3, "beam_size": 2}, {}, "nbest=3 is more than decoding.beam_size"),
        ({"nbest": 2, "strategy": "greedy"}, {}, "several hypotheses need beam"),
        ({"beam_size": "x"}, {}, "decoding.beam_size: expected an integer"),
        ({"unk_penalty": float("inf")}, {}, "decoding.unk_penalty: must be finite"),
        ({"no_such": 1}, {}, "decoding.no_such: unknown key"),
    ],
)
def test_options_that_do_not_fit_are_named_as_spelled(options, spelling, message):
    with pytest.raises(ConfigError) as e:
        DecodingConfig().with_options(options, spelling)
    assert message in str(e.value)


def test_nbest_widens_an_open_beam():
    cfg = DecodingConfig(strategy="beam", beam_size=2).with_options({"nbest": 4})
    assert (cfg.beam_size, cfg.nbest) == (4, 4)
    greedy = DecodingConfig(strategy="greedy", nbest=3).with_options({})
    assert greedy.nbest == 1  # a stored nbest means nothing to greedy search


def unk_loving(seed: int = 0):
    """A random model whose every step gives <unk> a large head start."""
    model = tiny_model(seed=seed)
    with torch.no_grad():
        model.tgt_embed.weight.mul_(4.0)
    project = model.project

    def biased(x):
        logits = project(x)
        logits[..., UNK_ID] += 6.0
        return logits

    model.project = biased
    return model


def hyps(results):
    return [h.tokens for r in results for h in r]


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_unk_penalty_steers_every_search(strategy):
    model = unk_loving()
    cfg = DecodingConfig(strategy=strategy, beam_size=3, max_len_b=6)

    def run(penalty):
        options = {"unk_penalty": penalty}
        return hyps(
            generate(
                model,
                SRC,
                cfg.with_options(options),
                generator=torch.Generator().manual_seed(0),
            )
        )

    unks = [sum(t.count(UNK_ID) for t in run(p)) for p in (-2.0, 0.0, 100.0)]
    assert unks[1] > 0  # the model loves <unk>
    assert unks[2] == 0  # a large penalty bans it
    assert unks[0] >= unks[1]  # a negative one asks for more


def test_unk_penalty_counts_in_the_score():
    model = unk_loving(seed=3)  # <unk> in some outputs, not in others
    penalty = 0.75
    cfg = DecodingConfig(strategy="greedy", max_len_b=6, unk_penalty=penalty)
    results = generate(model, SRC, cfg)
    assert any(UNK_ID in r[0].tokens for r in results)
    for row, r in zip(SRC, results, strict=True):
        out = r[0].tokens
        tgt_in = torch.tensor([[BOS_ID, *out]])
        with torch.no_grad():
            logp = model(row[None], tgt_in)[0].float().log_softmax(-1)  # (T+1, V)
        steps = logp[torch.arange(len(out)), torch.tensor(out, dtype=torch.long)]
        expected = steps.sum() + logp[len(out), EOS_ID]  # <eos> ends every output
        expected = expected.item() - penalty * out.count(UNK_ID)
        assert r[0].score == pytest.approx(expected, abs=1e-4)

"""Per-sentence controls in the search: target prefixes, forbidden phrases and
required phrases (dynamic beam allocation), in every search and architecture;
their checks and encoding."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import TGT, train_copy_model
from transformer.config import DecodingConfig
from transformer.controls import (
    ControlError,
    Controls,
    PieceControls,
    encode_controls,
)
from transformer.data import pad_sources
from transformer.models import Ensemble
from transformer.scoring import score_pairs
from transformer.search import generate

CPU = torch.device("cpu")
STRATEGIES = ["greedy", "beam", "sample"]


def sources(n: int = 24, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(4, 14) for _ in range(rng.randrange(3, 7))] for _ in range(n)
    ]


def config(strategy: str, **extra) -> DecodingConfig:
    return DecodingConfig(strategy=strategy, beam_size=5, **extra)


def has(seq: list[int], phrase: tuple[int, ...]) -> bool:
    n = len(phrase)
    return any(tuple(seq[i : i + n]) == phrase for i in range(len(seq) - n + 1))


def best(results) -> list[list[int]]:
    return [hyps[0].tokens for hyps in results]


# --- required phrases (beam search, dynamic beam allocation) ---


@pytest.mark.parametrize("length", [1, 2, 3])
def test_a_constraint_the_beam_already_meets_changes_nothing(copy_model, length):
    srcs = sources()
    src, cfg = pad_sources(srcs), config("beam")
    plain = generate(copy_model, src, cfg)
    rng = random.Random(length)
    controls = []
    for hyps in plain:
        out = hyps[0].tokens
        at = rng.randrange(0, len(out) - length + 1)
        controls.append(PieceControls(constraints=(tuple(out[at : at + length]),)))
    constrained = generate(copy_model, src, cfg, controls=controls)
    assert best(constrained) == best(plain)
    for p, c in zip(plain, constrained, strict=True):
        assert c[0].score == pytest.approx(p[0].score, abs=1e-5)
        assert c[0].unmet == ()


def test_constraints_force_their_phrases(copy_model):
    srcs = sources(16, seed=1)
    rng = random.Random(0)
    controls = []
    for s in srcs:
        # phrases the copy would not produce: pieces absent from the source
        absent = [t for t in range(4, 14) if t not in s]
        one = (rng.choice(absent),)
        two = tuple(rng.sample(absent, 2))
        controls.append(PieceControls(constraints=(one, two)))
    results = generate(copy_model, pad_sources(srcs), config("beam"), controls=controls)
    for c, hyps in zip(controls, results, strict=True):
        assert hyps[0].unmet == ()
        for phrase in c.constraints:
            assert has(hyps[0].tokens, phrase), (hyps[0].tokens, phrase)


def test_overlapping_and_multi_piece_constraints(copy_model):
    srcs = [[5, 6, 7, 8], [9, 10, 11], [4, 12, 13, 5, 6]]
    controls = [
        # they overlap in the copy: 5 6 7 meets both
        PieceControls(constraints=((5, 6), (6, 7))),
        # they share a first piece
        PieceControls(constraints=((9, 10, 11), (9, 12))),
        # one inside another, and a three-piece one absent from the source
        PieceControls(constraints=((12, 13, 5), (13,), (7, 8, 9))),
    ]
    results = generate(copy_model, pad_sources(srcs), config("beam"), controls=controls)
    for c, hyps in zip(controls, results, strict=True):
        assert hyps[0].unmet == ()
        assert all(has(hyps[0].tokens, p) for p in c.constraints), hyps[0].tokens
    assert best(results)[0] == [5, 6, 7, 8]  # both met by the copy itself


def test_constraints_that_cannot_fit_return_the_best_with_what_they_miss(copy_model):
    cfg = config("beam", max_len_a=0.0, max_len_b=4, nbest=2)  # 3 pieces + </s>
    controls = [PieceControls(constraints=((4, 5), (6, 7), (8,)))]
    results = generate(copy_model, pad_sources([[9, 10, 11]]), cfg, controls=controls)
    hyps = results[0]
    assert len(hyps[0].tokens) <= 3 and hyps[0].unmet
    met = [i for i, p in enumerate(controls[0].constraints) if has(hyps[0].tokens, p)]
    assert sorted(met + list(hyps[0].unmet)) == [0, 1, 2]


def test_constraints_need_beam_search(copy_model):
    controls = [PieceControls(constraints=((5,),))]
    with pytest.raises(ValueError, match="constraints need beam search"):
        generate(copy_model, pad_sources([[6, 7]]), config("greedy"), controls=controls)


# --- forbidden phrases ---


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forbidden_phrases_never_appear(copy_model, strategy):
    srcs = sources(16, seed=2)
    src = pad_sources(srcs)
    cfg = config(strategy, **({"nbest": 5} if strategy == "beam" else {}))
    plain = generate(copy_model, src, cfg, generator=torch.Generator().manual_seed(0))
    controls = []
    for hyps in plain:  # ban a piece and a pair the free output holds
        out = hyps[0].tokens
        controls.append(PieceControls(forbid=((out[0],), tuple(out[-2:]))))
    results = generate(
        copy_model, src, cfg, generator=torch.Generator().manual_seed(0),
        controls=controls,
    )  # fmt: skip
    for c, hyps, p in zip(controls, results, plain, strict=True):
        assert best([hyps]) != best([p])
        for h in hyps:
            for phrase in c.forbid:
                assert not has(h.tokens, phrase), (h.tokens, phrase)


# --- prefixes ---


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_output_starts_with_the_prefix_in_every_search(copy_model, strategy):
    srcs = sources(12, seed=3)
    rng = random.Random(4)
    # mixed lengths in one batch: the common part in one call, the rest forced
    controls = [
        PieceControls(prefix=tuple(rng.randrange(4, 14) for _ in range(n)))
        for n in [0, 1, 2, 3] * 3
    ]
    cfg = config(strategy, length_penalty=0.0)
    src = pad_sources(srcs)
    cached = generate(
        copy_model, src, cfg, generator=torch.Generator().manual_seed(1),
        controls=controls,
    )  # fmt: skip
    uncached = generate(
        copy_model, src, cfg, use_cache=False,
        generator=torch.Generator().manual_seed(1), controls=controls,
    )  # fmt: skip
    assert best(cached) == best(uncached)
    for c, hyps in zip(controls, cached, strict=True):
        assert hyps[0].tokens[: len(c.prefix)] == list(c.prefix)
    # the score counts the prefix: it is the teacher-forced score of the output
    scored = score_pairs(copy_model, srcs, best(cached), CPU, 4096)
    for hyps, s in zip(cached, scored, strict=True):
        assert hyps[0].score == pytest.approx(s.total, abs=1e-4)


def test_a_prefix_runs_through_the_decoder_in_one_call(copy_model, monkeypatch):
    widths = []
    decode = copy_model.decode

    def counting(tgt, memory, cache=None):
        widths.append(tgt.size(1))
        return decode(tgt, memory, cache)

    monkeypatch.setattr(copy_model, "decode", counting)
    controls = [PieceControls(prefix=(7, 8, 9)), PieceControls(prefix=(4, 5, 6))]
    results = generate(
        copy_model, pad_sources([[5, 6], [7, 8, 9, 10]]), config("beam"),
        controls=controls,
    )  # fmt: skip
    assert widths[0] == 4 and set(widths[1:]) == {1}  # <bos> and the prefix, once
    assert [h[0].tokens[:3] for h in results] == [[7, 8, 9], [4, 5, 6]]


def test_a_prefix_that_ends_a_word_bans_continuations_after_it(copy_model):
    # every piece but 9 "continues a word": the step after the prefix must take 9
    # (or </s>, here not yet allowed)
    after = tuple(i for i in range(4, 14) if i != 9)
    controls = [PieceControls(prefix=(5,), after_prefix=after)]
    for strategy in ("greedy", "beam"):
        cfg = config(strategy, min_len=3)
        out = generate(copy_model, pad_sources([[5, 6, 7]]), cfg, controls=controls)
        assert out[0][0].tokens[:2] == [5, 9]


def test_a_prefix_longer_than_the_limit_is_refused_by_the_search(copy_model):
    cfg = config("greedy", max_len_a=0.0, max_len_b=3)
    controls = [PieceControls(prefix=(5, 6, 7))]
    with pytest.raises(ValueError, match="sentence 1: a prefix of 3 pieces"):
        generate(copy_model, pad_sources([[5, 6]]), cfg, controls=controls)


# --- every architecture, ensembles ---


@pytest.mark.parametrize(
    "arch", [{"arch": "transformer"}, {"arch": "decoder_only"},
             {"arch": "rnn", "attention": "soft"}],
    ids=lambda a: a["arch"],
)  # fmt: skip
def test_controls_work_for_every_architecture_and_ensembles(arch):
    model = train_copy_model(0, **arch)  # untrained: the properties hold anyway
    srcs = [[5, 6, 7, 8], [9, 10, 11]]
    controls = [
        PieceControls(prefix=(5,), constraints=((12, 13),), forbid=((6,),)),
        PieceControls(prefix=(9, 10), constraints=((4,),), forbid=((11, 11),)),
    ]
    src = pad_sources(srcs)
    for m in (model, Ensemble([model]).eval()):
        for strategy in ("greedy", "beam"):
            c = controls if strategy == "beam" else [
                PieceControls(prefix=x.prefix, forbid=x.forbid) for x in controls
            ]  # fmt: skip
            results = generate(m, src, config(strategy), controls=c)
            for ctl, hyps in zip(c, results, strict=True):
                out = hyps[0].tokens
                assert out[: len(ctl.prefix)] == list(ctl.prefix)
                assert all(has(out, p) for p in ctl.constraints), out
                assert not any(has(out, p) for p in ctl.forbid), out
    one = generate(Ensemble([model]).eval(), src, config("beam"), controls=controls)
    assert best(one) == best(generate(model, src, config("beam"), controls=controls))


# --- checking and encoding the text ---


def test_controls_are_encoded_and_bad_ones_refused_with_a_message(tokenizer):
    text = TGT[3]
    ok = encode_controls(
        Controls(prefix="this is", constraints=("sentence",), forbid=("many words",)),
        tokenizer,
        limit=40,
    )
    assert ok.prefix == tuple(tokenizer.encode_tgt(["this is"])[0])
    assert ok.constraints == (tuple(tokenizer.encode_tgt(["sentence"])[0]),)
    assert ok.after_prefix == ()  # no trailing space: the word may go on
    spaced = encode_controls(Controls(prefix="this is "), tokenizer, limit=40)
    assert spaced.prefix == ok.prefix and spaced.after_prefix
    pieces = [tokenizer.tgt.id_to_piece(i) for i in spaced.after_prefix]
    assert not any(p.startswith("\u2581") for p in pieces)
    cases = [
        (Controls(constraints=("words", " ")), "constraints[1]: empty phrase"),
        (Controls(forbid=("",)), "forbid[0]: empty phrase"),
        (Controls(prefix=text), "prefix: "),
        (Controls(constraints=(text,)), "constraints[0] "),
        (
            Controls(constraints=("number",), forbid=("number",)),
            "forbid[0] 'number' is",
        ),
        (Controls(constraints=("many words",), forbid=("words",)), "is part of the"),
        (Controls(prefix="this is", forbid=("is",)), "is part of the prefix"),
        (Controls(constraints=("a",) * 17), "at most 16"),
    ]
    for controls, message in cases:
        with pytest.raises(ControlError, match=message.replace("[", r"\[")):
            encode_controls(controls, tokenizer, limit=8)


def test_controls_from_json_objects_name_the_bad_key():
    assert Controls.from_dict({"prefix": None, "constraints": ["a"]}) == Controls(
        "", ("a",), ()
    )
    for obj, message in [
        ({"prefix": 3}, "prefix: expected a string, got int"),
        ({"constraints": "a"}, "constraints: expected a list of strings, got str"),
        ({"forbid": ["a", 2]}, r"forbid\[1\]: expected a string"),
        ({"constrains": []}, "unknown key 'constrains'"),
    ]:
        with pytest.raises(ControlError, match=message):
            Controls.from_dict(obj)

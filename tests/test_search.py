"""Search: greedy, beam and sampling agree with their definitions."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from tests.conftest import tiny_model
from transformer import stepper
from transformer.beam import length_penalty, topk_rows
from transformer.config import BOS_ID, EOS_ID, DecodingConfig
from transformer.controls import PieceControls
from transformer.models import Ensemble
from transformer.search import (
    decode_corpus,
    filter_logits,
    generate,
    max_lengths,
)

SRC = torch.tensor([[5, 6, 7, 8, 9, 3], [10, 11, 3, 0, 0, 0], [12, 13, 4, 3, 0, 0]])


def sharp_model(seed=0, **overrides):
    """A random model with peaked output distributions, so outputs vary by input."""
    model = tiny_model(seed=seed, **overrides)
    with torch.no_grad():
        model.tgt_embed.weight.mul_(8.0)
    return model


def tokens(results):
    return [[h.tokens for h in hyps] for hyps in results]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_equals_greedy(seed, half_trained):
    model = half_trained if seed == 0 else sharp_model(seed)
    greedy = generate(model, SRC, DecodingConfig(strategy="greedy"))
    cfg = DecodingConfig(strategy="beam", beam_size=1, length_penalty=0.0)
    beam = generate(model, SRC, cfg)
    assert tokens(greedy) == tokens(beam)
    for g, b in zip(greedy, beam, strict=True):
        assert abs(g[0].score - b[0].score) < 1e-4


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_and_uncached_decoding_agree(strategy, half_trained):
    model = half_trained
    cfg = DecodingConfig(strategy=strategy, beam_size=4, nbest=3)
    cached = generate(model, SRC, cfg, use_cache=True)
    uncached = generate(model, SRC, cfg, use_cache=False)
    assert tokens(cached) == tokens(uncached)


def test_batch_results_equal_single_sentence_results(half_trained):
    model = half_trained
    cfg = DecodingConfig(strategy="beam", beam_size=3, nbest=2)
    batched = generate(model, SRC, cfg)
    for i in range(SRC.size(0)):
        row = SRC[i : i + 1, : int((SRC[i] != 0).sum())]
        assert tokens(generate(model, row, cfg)) == tokens(batched[i : i + 1])


def sequence_logprob(model, src, seq):
    tgt = torch.tensor([[BOS_ID, *seq]])
    logp = torch.log_softmax(model(src, tgt)[0].float(), -1)
    target = torch.tensor([*seq])
    return logp.gather(1, target[:, None]).sum().item()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_large_beam_finds_exhaustive_optimum(alpha):
    model = sharp_model(5, tgt_vocab_size=7, src_vocab_size=7)
    src = torch.tensor([[4, 5, 6, 3]])
    max_len = 3  # tokens including <eos>
    cfg = DecodingConfig(
        strategy="beam",
        beam_size=16,
        length_penalty=alpha,
        max_len_a=0.0,
        max_len_b=max_len,
    )
    content = [1, 4, 5, 6]  # every token but pad, bos, eos
    candidates = []
    for n in range(max_len):
        for body in itertools.product(content, repeat=n):
            seq = [*body, EOS_ID]
            score = sequence_logprob(model, src, seq) / length_penalty(len(seq), alpha)
            candidates.append((score, list(body)))
    best_score, best = max(candidates)
    found = generate(model, src, cfg)[0][0]
    assert found.tokens == best
    assert abs(found.score - best_score) < 1e-4


def test_nbest_is_sorted_and_distinct(half_trained):
    model = half_trained
    results = generate(
        model, SRC, DecodingConfig(strategy="beam", beam_size=5, nbest=5)
    )
    for hyps in results:
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps) == 5


def test_top_k_one_equals_greedy(half_trained):
    model = half_trained
    greedy = generate(model, SRC, DecodingConfig(strategy="greedy"))
    sampled = generate(
        model,
        SRC,
        DecodingConfig(strategy="sample", top_k=1),
        generator=torch.Generator().manual_seed(0),
    )
    assert tokens(greedy) == tokens(sampled)


def test_sampling_is_reproducible_with_a_seed(half_trained):
    model = half_trained
    cfg = DecodingConfig(strategy="sample", temperature=1.5)
    runs = [
        tokens(generate(model, SRC, cfg, generator=torch.Generator().manual_seed(s)))
        for s in (11, 11, 12)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_p_never_samples_outside_the_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(4, 30) * 2
    top_p = 0.6
    filtered = filter_logits(logits, top_p=top_p)
    probs = logits.softmax(-1)
    for row in range(4):
        order = probs[row].argsort(descending=True).tolist()
        nucleus, mass = set(), 0.0
        for token in order:  # the smallest prefix reaching top_p
            nucleus.add(token)
            mass += probs[row, token].item()
            if mass >= top_p:
                break
        assert (
            set(torch.isfinite(filtered[row]).nonzero().flatten().tolist()) == nucleus
        )
        draws = torch.multinomial(filtered[row].softmax(-1), 2000, replacement=True)
        assert set(draws.tolist()) <= nucleus


def test_top_k_keeps_k_tokens():
    logits = torch.randn(3, 20)
    kept = torch.isfinite(filter_logits(logits, top_k=5)).sum(-1)
    assert kept.tolist() == [5, 5, 5]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_length_limits_and_min_length(strategy, half_trained):
    def lengths(**limits):
        cfg = DecodingConfig(strategy=strategy, beam_size=3, **limits)
        return [len(hyps[0].tokens) for hyps in generate(half_trained, SRC, cfg)]

    # the model copies sources of 5, 2 and 3 tokens: left alone, some outputs are
    # longer than the limit and some shorter than the minimum tried below
    free = lengths(max_len_b=20)
    assert max(free) > 3 and min(free) < 5, free
    assert max(lengths(max_len_a=0.0, max_len_b=4)) <= 3  # 4 including <eos>
    assert min(lengths(min_len=5, max_len_b=20)) >= 5


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_each_sentence_stops_at_its_own_eos(strategy, half_trained):
    # the sentences of the batch end at different steps, each by its own <eos>;
    # one that has ended takes no more tokens: its score is that of its tokens
    # and <eos> alone (and no hypothesis holds an <eos> inside)
    model, alpha = half_trained, 0.6
    cfg = DecodingConfig(
        strategy=strategy,
        beam_size=3,
        nbest=3 if strategy == "beam" else 1,
        length_penalty=alpha,
        max_len_b=30,
    )
    results = generate(model, SRC, cfg)
    best = [len(hyps[0].tokens) for hyps in results]
    assert len(set(best)) > 1, best
    limits = max_lengths(SRC, cfg, model.target_positions(SRC)).tolist()
    assert all(n + 1 < limit for n, limit in zip(best, limits, strict=True))
    for i, hyps in enumerate(results):
        src = SRC[i : i + 1, : int((SRC[i] != 0).sum())]
        for h in hyps:
            assert EOS_ID not in h.tokens and BOS_ID not in h.tokens
            expected = sequence_logprob(model, src, [*h.tokens, EOS_ID])
            if strategy == "beam":
                expected /= length_penalty(len(h.tokens) + 1, alpha)
            assert h.score == pytest.approx(expected, abs=1e-4)


def test_decode_corpus_keeps_input_order(half_trained):
    model = half_trained
    sources = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [4, 12]]
    cfg = DecodingConfig(strategy="beam", beam_size=2, max_tokens=8)
    got = decode_corpus(model, sources, cfg, torch.device("cpu"))
    for src, hyps in zip(sources, got, strict=True):
        single = generate(model, torch.tensor([[*src, EOS_ID]]), cfg)
        assert hyps[0].tokens == single[0][0].tokens


def test_length_penalty_formula():
    assert length_penalty(1, 0.0) == 1.0
    assert math.isclose(length_penalty(7, 0.6), (12 / 6) ** 0.6)


READS = ("item", "tolist", "nonzero", "__int__", "__index__", "__float__", "__bool__")


def count_reads(monkeypatch, model, src, cfg):
    """Host reads of tensor values (``READS``) and steps of one ``generate``."""
    from transformer.stepper import Stepper

    counts = {"reads": 0, "steps": 0}

    def counting(original, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in READS:
            patch.setattr(
                torch.Tensor, name, counting(getattr(torch.Tensor, name), "reads")
            )
        patch.setattr(Stepper, "step", counting(Stepper.step, "steps"))
        results = generate(model, src, cfg)
    return counts["reads"], counts["steps"], results


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_step_loop_reads_the_device_once_per_step(strategy, half_trained, monkeypatch):
    # one sentence, then the same sentence 16 times: the same steps, 16 times the
    # finished hypotheses. A read per finished hypothesis would show as a difference.
    cfg = DecodingConfig(strategy=strategy, beam_size=5, nbest=5, max_len_b=12)
    one = SRC[:1]
    reads_one, steps, results = count_reads(monkeypatch, half_trained, one, cfg)
    many = one.expand(16, -1).contiguous()
    reads_many, steps_many, results_many = count_reads(
        monkeypatch, half_trained, many, cfg
    )
    assert steps_many == steps > 3
    assert tokens(results_many) == tokens(results) * 16
    finished = sum(len(hyps) for hyps in results_many)
    assert finished >= 16 * cfg.nbest if strategy == "beam" else finished == 16
    assert reads_many == reads_one
    # per step: the search's "all done?" read and the model's own CPU id check of
    # the new tokens (a device-side assert on GPUs); per batch: the source check,
    # the length limits and the results (two reads for greedy, four for beam)
    assert reads_one <= 2 * steps + 6


def test_decode_corpus_rejects_ids_outside_the_vocabulary(half_trained):
    vocab = half_trained.cfg.src_vocab_size
    with pytest.raises(
        ValueError, match=rf"sentence 2: source ids must be in \[0, {vocab}\)"
    ):
        decode_corpus(
            half_trained, [[5, 6], [7, vocab]], DecodingConfig(), torch.device("cpu")
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_decoding_step_and_training_forward_do_not_sync(half_trained):
    from transformer.training.loss import label_smoothed_loss

    model = copy.deepcopy(half_trained).cuda()
    src = SRC.cuda()
    memory = model.encode(src)
    cache = model.new_cache()
    tokens = torch.full((src.size(0), 1), BOS_ID, device="cuda")
    model.decode(tokens, memory, cache)  # the first step fills the cross K/V
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            logits = model.decode(tokens, memory, cache)
            tokens = logits[:, -1].argmax(-1, keepdim=True)
        model.train()
        loss = label_smoothed_loss(model(src, src), src, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("width", [640, 8000, 8003, 100])
def test_topk_rows_is_topk(width):
    torch.manual_seed(width)
    x = torch.randn(37, width).log_softmax(-1)
    x[3] = -math.inf  # a row at its length limit: only <eos> left
    x[3, EOS_ID] = -0.5
    x[5, ::2] = -math.inf  # half the vocabulary banned
    for k in (1, 5, 10):
        values, columns = topk_rows(x, k)
        expected = x.topk(k, dim=-1)
        assert torch.equal(values, expected.values)
        # the columns hold those values (columns of -inf may differ)
        assert torch.equal(x.gather(1, columns), values)
        finite = values.isfinite()
        assert torch.equal(columns[finite], expected.indices[finite])
        assert all(len(set(r)) == k for r in columns.tolist())  # no repeats


def test_topk_rows_with_ties_returns_tied_columns():
    x = torch.zeros(4, 2048)
    x[:, 100] = 1.0
    values, columns = topk_rows(x, 3)
    assert values.tolist() == [[1.0, 0.0, 0.0]] * 4
    assert columns[:, 0].tolist() == [100] * 4
    assert all(len(set(r)) == 3 for r in columns.tolist())


BUCKET_MODELS = {
    "transformer": lambda: sharp_model(3),
    "rnn": lambda: sharp_model(3, arch="rnn", rnn_hidden=32),
    "decoder_only": lambda: sharp_model(3, arch="decoder_only"),
    "ensemble": lambda: Ensemble([sharp_model(3), sharp_model(4)]).eval(),
}


def bucket_sources(count=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(count, 9, dtype=torch.long)
    for i in range(count):
        n = int(torch.randint(2, 9, (1,), generator=g))
        src[i, :n] = torch.randint(4, 23, (n,), generator=g)
        src[i, n] = EOS_ID
    return src


@pytest.mark.parametrize("name", sorted(BUCKET_MODELS))
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_bf16_row_buckets_change_nothing_but_row_counts(name, strategy, monkeypatch):
    """A bf16 CPU search pads its decoder rows to whole buckets (copies of a
    live sentence's rows) and drops their output: the same results as unpadded,
    while the decoder sees only multiples of the bucket after the first step."""
    model = BUCKET_MODELS[name]().to(torch.bfloat16)
    src = bucket_sources()
    nbest = 2 if strategy == "beam" else 1
    cfg = DecodingConfig(strategy=strategy, beam_size=3, nbest=nbest)
    # a prefix, and in beam search a required phrase (dynamic beam allocation)
    wanted = ((9, 10),) if strategy == "beam" else ()
    controls = [
        PieceControls(prefix=(7,), constraints=wanted) if i % 4 == 0 else None
        for i in range(8)
    ]
    rows: list[int] = []
    members = getattr(model, "models", [model])
    decode = type(members[0]).decode

    def counting(self, tgt, *args, **kwargs):
        if self is members[0]:
            rows.append(tgt.size(0))
        return decode(self, tgt, *args, **kwargs)

    monkeypatch.setattr(type(members[0]), "decode", counting)
    runs = {}
    for bucket in (0, stepper.ROW_BUCKET):
        monkeypatch.setattr(stepper, "ROW_BUCKET", bucket)
        rows.clear()
        plain = generate(model, src, cfg)
        prefixed = generate(model, src[:8], cfg, controls=controls)
        runs[bucket] = (plain, prefixed, list(rows))
    (plain, prefixed, _), (padded, padded_prefixed, seen) = runs.values()
    for a, b in ((plain, padded), (prefixed, padded_prefixed)):
        assert tokens(a) == tokens(b)
        for x, y in zip(a, b, strict=True):
            assert [h.score for h in x] == pytest.approx([h.score for h in y], abs=1e-4)
    per = cfg.beam_size if strategy == "beam" else 1
    unit = per * -(-stepper.ROW_BUCKET // per)
    later = [n for n in seen if n not in (src.size(0), 8)]
    assert later and all(n % unit == 0 for n in later)
    assert len(set(seen)) < len(set(runs[0][2]))  # fewer shapes than unpadded


def test_float32_search_does_not_pad_rows(half_trained):
    step = stepper.Stepper(half_trained, half_trained.encode(SRC), True, False)
    assert step.bucket == 0

"""torch.compile: the training forward + loss is one graph, batch shapes are dynamic.

Compiling with the default (inductor) backend takes minutes on a CPU; these tests
use dynamo's eager backends, which trace the same graphs without generating code.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from tests.conftest import tiny, tiny_model
from tests.test_search import SRC
from transformer.config import DecodingConfig
from transformer.search import generate
from transformer.training import Trainer
from transformer.training.loss import forward_loss

# dynamo traces for seconds per graph: the quick lane leaves these to CI
pytestmark = pytest.mark.slow


def random_ids(b, t, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (b, t), generator=g)


def test_forward_and_loss_are_one_graph():
    torch._dynamo.reset()
    model = tiny_model(dropout=0.1).train()
    src, tgt_in, tgt_out = random_ids(3, 7), random_ids(3, 6, seed=1), random_ids(3, 6)
    tgt_out[0, 4:] = 0  # padding
    args = (model, src, tgt_in, tgt_out, torch.device("cpu"), "fp32", 0.1, 4)
    explained = torch._dynamo.explain(forward_loss)(*args)
    assert explained.break_reasons == []
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_bad_ids_fail_inside_the_compiled_graph():
    torch._dynamo.reset()
    model = tiny_model()
    compiled = torch.compile(forward_loss, backend="eager")
    src = random_ids(2, 5)
    src[1, 2] = 99
    tgt = random_ids(2, 4)
    with pytest.raises(RuntimeError, match=r"source ids must be in \[0, 23\)"):
        compiled(model, src, tgt, tgt, torch.device("cpu"), "fp32", 0.1, 4)


def test_training_step_compiles_once_for_all_batch_shapes(
    tmp_path, toy_tokenizer, monkeypatch
):
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(
        torch, "compile", functools.partial(torch.compile, backend=counter)
    )
    compiled = Trainer(
        tiny(
            tmp_path / "c", toy_tokenizer, "model.dropout=0.0", "training.compile=true"
        )
    )
    eager = Trainer(tiny(tmp_path / "e", toy_tokenizer, "model.dropout=0.0"))
    shapes = set()
    for ids in (range(0, 12), range(40, 47), range(100, 103), range(7, 30)):
        batch = compiled.train_data.collate(np.array(list(ids)))
        shapes.add((tuple(batch.src.shape), tuple(batch.tgt_in.shape)))
        got, want = compiled.train_step([batch]), eager.train_step([batch])
        assert got.loss == pytest.approx(want.loss, rel=1e-5)
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-4)
    assert len(shapes) == 4
    # the bound: one graph for every batch of two or more sentences of two or more
    # tokens (sizes 0 and 1 are specialised by dynamo and would add one each)
    assert counter.frame_count == 1


def test_compiled_decoding_step_gives_the_same_results(monkeypatch, half_trained):
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(
        torch, "compile", functools.partial(torch.compile, backend=counter)
    )

    def run(cfg, src, compile):
        seed = torch.Generator().manual_seed(1)
        out = generate(half_trained, src, replace(cfg, compile=compile), generator=seed)
        return [[(h.tokens, h.score) for h in hyps] for hyps in out]

    cases = [
        (DecodingConfig(strategy=strategy, beam_size=3, nbest=2), src)
        for strategy in ("greedy", "sample", "beam")
        for src in (SRC, SRC[1:, :4])
    ]
    for cfg, src in cases:
        assert run(cfg, src, True) == run(cfg, src, False)
    graphs = counter.frame_count
    for cfg, src in cases:  # the same shapes again compile nothing
        run(cfg, src, True)
    # the bound (docs: benchmarks): greedy and sampling share 3 graphs (no pending
    # reorder, a reorder, a single row); beam search adds 2 (beams sharing a row)
    assert counter.frame_count == graphs <= 5


def test_a_compiled_cpu_lookup_keeps_atens_backward():
    """Under ``torch.compile`` a training lookup's backward is ATen's kernel (the
    custom operator), not inductor's scatter of atomic adds; the same gradient
    as eager, the padding row's zero. Eager keeps ``F.embedding``."""
    from transformer.embeddings import TokenEmbedding

    torch._dynamo.reset()
    emb = TokenEmbedding(50, 16, pad_id=0)
    tokens = random_ids(4, 9, vocab=50)
    tokens[0, -3:] = 0
    weights = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(2))

    def loss(tokens):
        return (emb(tokens) * weights).sum()

    def grad_and_ops(fn):
        emb.zero_grad(set_to_none=True)
        with torch.profiler.profile() as prof:
            fn(tokens).backward()
        return emb.weight.grad.clone(), {e.name for e in prof.events()}

    want, eager_ops = grad_and_ops(loss)
    got, compiled_ops = grad_and_ops(torch.compile(loss))  # inductor
    assert "transformer::embedding_backward" in compiled_ops
    assert "transformer::embedding_backward" not in eager_ops
    assert "aten::embedding_dense_backward" in eager_ops
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got[0] == 0).all() and (got[tokens.unique()[1:]] != 0).any()
    with torch.no_grad():  # decoding: the plain lookup, compiled or not
        assert torch.equal(torch.compile(emb)(tokens), emb(tokens))

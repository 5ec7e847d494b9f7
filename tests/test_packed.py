"""bf16 decoding on a CPU: linear layers over packed weights
(``transformer.packed``) and the few-query attention of a decoding step
(``attention.few_query_attention``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import tiny_model
from transformer import attention
from transformer.attention import few_query_attention, reference_attention
from transformer.config import DecodingConfig
from transformer.models import Ensemble
from transformer.packed import PackedLinear, pack_linear_layers, packing_available
from transformer.search import generate

packs = pytest.mark.skipif(
    not packing_available(), reason="this torch or CPU runs no oneDNN bf16 products"
)


def bf16_linear(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(24, 40, bias=bias).to(torch.bfloat16)


@packs
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, F.relu])
def test_packed_linear_equals_the_plain_product(bias, activation):
    plain = bf16_linear(bias=bias)
    packed = PackedLinear(plain.weight, plain.bias, activation)
    act = activation or (lambda y: y)
    for shape in [(1, 24), (7, 24), (3, 5, 24)]:
        x = torch.randn(*shape).to(torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(packed(x), act(plain(x)))
        # a non-contiguous input
        xt = torch.randn(24, 6).to(torch.bfloat16).t()
        with torch.inference_mode():
            assert torch.equal(packed(xt), act(plain(xt)))
    assert packed.state_dict().keys() == plain.state_dict().keys()


@packs
def test_packed_linear_repacks_a_weight_changed_in_place():
    """The packed copy follows ``load_state_dict`` and in-place edits: never
    stale."""
    plain = bf16_linear()
    packed = PackedLinear(plain.weight, plain.bias)
    x = torch.randn(4, 24).to(torch.bfloat16)
    with torch.inference_mode():
        before = packed(x)
    with torch.no_grad():
        packed.load_state_dict(bf16_linear(seed=1).state_dict())
    with torch.inference_mode():
        after = packed(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, F.linear(x, plain.weight, plain.bias))


@packs
def test_packed_linear_trains_and_copies_like_a_linear_layer():
    """With autograd (or float32 inputs) it is ``nn.Linear``, the activation
    included; a deep copy packs its own weight."""
    plain = bf16_linear()
    packed = PackedLinear(plain.weight, plain.bias, F.relu)
    x = torch.randn(5, 24).to(torch.bfloat16)
    out = packed(x)
    out.float().sum().backward()
    assert plain.weight.grad is not None
    assert torch.equal(out.detach(), F.relu(plain(x)).detach())
    copied = copy.deepcopy(packed)
    with torch.inference_mode():
        assert torch.equal(copied(x), packed(x))
    assert copied.weight.data_ptr() != packed.weight.data_ptr()


def biased(model):
    """A tied output layer with a bias of its own (a Marian import's)."""
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)
    return model


BUILDERS = {
    "transformer": lambda: tiny_model(3),
    "untied": lambda: tiny_model(3, tie_output_embeddings=False),
    "logits_bias": lambda: biased(tiny_model(3, final_logits_bias=True)),
    "rnn": lambda: tiny_model(3, arch="rnn", rnn_hidden=32),
    "decoder_only": lambda: tiny_model(3, arch="decoder_only"),
    "ensemble": lambda: Ensemble([tiny_model(3), tiny_model(4)]).eval(),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_packing_changes_no_translation(name, strategy):
    """A bf16 model with packed linear layers (the ReLU fused, a tied output
    layer packed too) decodes exactly as the same model unpacked; where the CPU
    or torch cannot pack, nothing changes."""
    model = BUILDERS[name]().to(torch.bfloat16)
    plain = copy.deepcopy(model)
    pack_linear_layers(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if name == "logits_bias":  # its tied output layer keeps the fused bias
        assert model.output_proj is None
    if packing_available():
        assert linears and all(type(m) is PackedLinear for m in linears)
    else:
        assert not any(type(m) is PackedLinear for m in linears)
    src = torch.tensor([[5, 6, 7, 2, 0], [9, 8, 2, 0, 0], [4, 5, 6, 7, 2]])
    cfg = DecodingConfig(strategy=strategy, beam_size=3, nbest=2, max_len_b=12)
    ours, theirs = generate(model, src, cfg), generate(plain, src, cfg)
    assert [[h.tokens for h in s] for s in ours] == [
        [h.tokens for h in s] for s in theirs
    ]
    assert [[h.score for h in s] for s in ours] == [
        [h.score for h in s] for s in theirs
    ]


def float64_attention(q, k, v, mask=None):
    return reference_attention(q.double(), k.double(), v.double(), mask)[0]


@pytest.mark.parametrize("queries", [1, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_few_query_attention_is_float32_math_of_the_bf16_values(queries, masked):
    """Against float64 on the same bf16 values: off by at most the output's own
    rounding to bf16 (SDPA's bf16 kernel is no closer)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        (torch.randn(6, 4, n, 16, generator=g) * 2).to(torch.bfloat16)
        for n in (queries, 11, 11)
    )
    mask = None
    if masked:
        mask = torch.ones(6, 1, 1, 11, dtype=torch.bool)
        mask[::2, ..., 7:] = False
    exact = float64_attention(q, k, v, mask)
    out = few_query_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    rounding = (exact - exact.to(torch.bfloat16).double()).abs().max()
    assert (out.double() - exact).abs().max() <= rounding + 1e-12
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out.double() - exact).abs().mean() <= (
        (sdpa.double() - exact).abs().mean() + 1e-12
    )
    # float32 keys and values (a float32 cache) with bf16 queries: the same
    mixed = few_query_attention(q, k.float(), v.float(), mask)
    assert torch.equal(mixed, out)


def test_a_bf16_decoding_step_takes_the_few_query_path(monkeypatch):
    """One query per row (and a sentence's beams, grouped, in cross-attention)
    on bf16 CPU tensors without autograd: few-query attention; many queries,
    float32, a causal mask or autograd (training): SDPA."""
    calls = []
    real = attention.few_query_attention
    monkeypatch.setattr(
        attention,
        "few_query_attention",
        lambda q, *a: calls.append(q.size(2)) or real(q, *a),
    )
    layer = attention.SelfAttention(32, 4, 0.0).eval()
    for dtype, t, causal, expected in [
        (torch.bfloat16, 1, False, [1]),
        (torch.bfloat16, attention.FEW_QUERIES, False, [attention.FEW_QUERIES]),
        (torch.bfloat16, attention.FEW_QUERIES + 1, False, []),
        (torch.bfloat16, 3, True, []),
        (torch.float32, 1, False, []),
    ]:
        calls.clear()
        layer.to(dtype)
        q = k = v = torch.randn(2, 4, t, 8).to(dtype)
        with torch.inference_mode():
            out = layer.attend(q, k, v, None, causal)
        assert calls == expected
        assert out.shape == (2, t, 32)
    # grouped beams: 3 rows share one source row, 3 queries per call
    calls.clear()
    layer.to(torch.bfloat16)
    q = torch.randn(6, 4, 1, 8).to(torch.bfloat16)
    kv = torch.randn(2, 4, 5, 8).to(torch.bfloat16)
    with torch.inference_mode():
        layer.attend(q, kv, kv, torch.ones(2, 1, 1, 5, dtype=torch.bool), False)
    assert calls == [3]
    # with autograd, as in training: SDPA
    calls.clear()
    q = k = v = torch.randn(2, 4, 1, 8).to(torch.bfloat16)
    layer.attend(q, k, v, None, False)
    assert calls == []


def test_few_query_attention_gives_a_query_with_no_key_zeros_as_sdpa():
    q, k, v = (torch.randn(3, 2, n, 8).to(torch.bfloat16) for n in (1, 4, 4))
    mask = torch.ones(3, 1, 1, 4, dtype=torch.bool)
    mask[1] = False  # row 1 may attend nothing
    out = few_query_attention(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(sdpa[1], out[1])
    assert torch.isfinite(out).all()

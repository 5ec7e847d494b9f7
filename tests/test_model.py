"""Model correctness: positions, attention, masks, the KV cache and sizes."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny_config, tiny_model
from transformer.attention import causal_mask, reference_attention
from transformer.config import ConfigError, model_config
from transformer.embeddings import sinusoidal_table
from transformer.models import Transformer, count_parameters


def random_batch(lengths, vocab=23, pad=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, :n] = torch.randint(4, vocab, (n,), generator=g)
    return out


def test_sinusoidal_table_matches_float64_formula():
    n, d = 50, 16
    table = sinusoidal_table(n, d)
    for pos in range(n):
        for j in range(d):
            i = j // 2
            angle = pos / (10000 ** (2 * i / d))
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert abs(table[pos, j].item() - expected) < 1e-6, (pos, j)


def test_sinusoidal_table_odd_width():
    table = sinusoidal_table(7, 5)
    assert table.shape == (7, 5)
    assert abs(table[3, 4].item() - math.sin(3 / 10000 ** (4 / 5))) < 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_reference_math(causal):
    torch.manual_seed(0)
    model = tiny_model()
    attn = model.decoder[0].self_attn
    q, k, v = (torch.randn(3, 4, 6, 8, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([6, 4, 2])
    mask = (torch.arange(6)[None, :] < lengths[:, None])[:, None, None, :]
    if causal:
        mask = mask & causal_mask(6, 6)
    # float64 reference written out from the formula, independently of the module
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(8)
    scores = scores.masked_fill(~mask, float("-inf"))
    expected = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)
    got, weights = reference_attention(q, k, v, mask)
    torch.testing.assert_close(got, expected)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 4, 6, dtype=torch.float64))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(sdpa, expected)
    # and the module's own path, both ways, in float32
    attn.record_weights = False
    fast = attn.attend(q.float(), k.float(), v.float(), mask, is_causal=False)
    attn.record_weights = True
    slow = attn.attend(q.float(), k.float(), v.float(), mask, is_causal=False)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert attn.weights.shape == (3, 4, 6, 6)


def test_is_causal_reference_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    got, _ = reference_attention(q, k, v, is_causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_causality(norm_first):
    model = tiny_model(norm_first=norm_first)
    src = random_batch([7, 5])
    tgt = random_batch([6, 6], seed=2)
    base = model(src, tgt)
    for t in range(5):
        changed = tgt.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1 - 4) % 19 + 4
        out = model(src, changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("norm_first", [False, True])
def test_padding_invariance(norm_first):
    model = tiny_model(norm_first=norm_first)
    src = random_batch([9, 4, 6])
    tgt = random_batch([5, 3, 7], seed=3)
    batched = model(src, tgt)
    for i, (s, t) in enumerate([(9, 5), (4, 3), (6, 7)]):
        alone = model(src[i : i + 1, :s], tgt[i : i + 1, :t])
        torch.testing.assert_close(batched[i : i + 1, :t], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_decoding_matches_teacher_forcing(positional, norm_first):
    model = tiny_model(positional=positional, norm_first=norm_first)
    src = random_batch([8, 3, 6])
    tgt = random_batch([7, 7, 7], seed=4)
    tgt[:, 0] = 2  # <bos>
    full = model(src, tgt)
    memory = model.encode(src)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t : t + 1], memory, cache) for t in range(tgt.size(1))]
    stepped = torch.cat(steps, dim=1)
    assert (stepped - full).abs().max().item() < 1e-4
    assert cache.length == tgt.size(1)


def test_cached_decoding_in_chunks():
    model = tiny_model()
    src = random_batch([8, 5])
    tgt = random_batch([9, 9], seed=5)
    full = model(src, tgt)
    memory = model.encode(src)
    cache = model.new_cache()
    parts = [
        model.decode(tgt[:, a:b], memory, cache) for a, b in [(0, 3), (3, 4), (4, 9)]
    ]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "reorders",
    [[[2, 0, 0, 1]], [[2, 0, 1, 1], [3, 0]]],
    ids=["one", "two-composed"],
)
def test_reorder_then_step_equals_recompute(reorders):
    model = tiny_model()
    src = random_batch([8, 3, 6])
    tgt = random_batch([5, 5, 5], seed=6)
    memory = model.encode(src)
    cache = model.new_cache()
    model.decode(tgt[:, :4], memory, cache)
    index = torch.arange(3)
    for rows in reorders:  # several reorders before a step compose
        cache.reorder(torch.tensor(rows))
        index = index[torch.tensor(rows)]
    stepped = model.decode(tgt[index, 4:5], memory, cache)
    expected = model(src[index], tgt[index])[:, 4:5]
    assert (stepped - expected).abs().max().item() < 1e-4
    # cross-attention K/V were projected once and reordered, not recomputed
    assert cache.layers[0].cross_k.size(0) == len(index)


def test_base_parameter_count_matches_closed_form():
    d, ff, v, n = 512, 2048, 37000, 6
    cfg = model_config(
        src_vocab_size=v, tgt_vocab_size=v, d_model=d, n_heads=8, d_ff=ff
    )
    attention = 4 * (d * d + d)  # Q, K, V, output projections with biases
    ffn = (d * ff + ff) + (ff * d + d)
    norm = 2 * d
    encoder_layer = attention + ffn + 2 * norm
    decoder_layer = 2 * attention + ffn + 3 * norm
    closed_form = v * d + n * encoder_layer + n * decoder_layer  # one tied embedding
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_parameters(model) == closed_form
    assert 62e6 < closed_form < 64e6


def test_untied_output_adds_parameters():
    tied = count_parameters(tiny_model())
    untied = count_parameters(tiny_model(tie_output_embeddings=False))
    separate = count_parameters(tiny_model(tie_src_tgt_embeddings=False))
    assert untied - tied == 23 * 32
    assert separate - tied == 23 * 32


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=30, n_heads=4), "model.d_model"),
        (dict(dropout=1.0), "model.dropout"),
        (dict(attention_dropout=-0.1), "model.attention_dropout"),
        (dict(encoder_layers=0), "model.encoder_layers"),
        (dict(src_vocab_size=20, tgt_vocab_size=23), "model.tie_src_tgt_embeddings"),
    ],
)
def test_invalid_model_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Transformer(tiny_config(**overrides))


def test_bad_ids_give_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"source ids must be in \[0, 23\)"):
        model.encode(torch.tensor([[5, 99]]))
    with pytest.raises(ValueError, match="max_positions=64"):
        model.encode(torch.full((1, 70), 5))


@pytest.mark.slow
def test_copy_task_is_learned():
    torch.manual_seed(0)
    cfg = tiny_config(
        d_model=64, d_ff=128, max_positions=32, src_vocab_size=14, tgt_vocab_size=14
    )
    model = Transformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))

    def batch(n=64):
        length = torch.randint(3, 9, (1,)).item()
        body = torch.randint(4, 14, (n, length))
        eos = torch.full((n, 1), 3)
        bos = torch.full((n, 1), 2)
        src = torch.cat([body, eos], 1)
        return src, torch.cat([bos, body], 1), torch.cat([body, eos], 1)

    model.train()
    for _ in range(600):
        src, tgt_in, tgt_out = batch()
        loss = torch.nn.functional.cross_entropy(
            model(src, tgt_in).flatten(0, 1), tgt_out.flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        src, tgt_in, tgt_out = batch(256)
        accuracy = (model(src, tgt_in).argmax(-1) == tgt_out).float().mean().item()
    assert accuracy > 0.95

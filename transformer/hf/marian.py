"""Our Transformer and transformers' MarianMT, weight for weight.

MarianMT (``modeling_marian.py``) is the paper's post-norm encoder-decoder with
embeddings scaled by sqrt(d_model), no embedding LayerNorm, sinusoidal positions
it computes itself, separate Q/K/V projections and a fixed ``final_logits_bias``.
Ours differs in three layouts, each mapped exactly:

- The model dimension. Our sinusoids interleave sin and cos (dimension 2i holds
  sin at frequency i, 2i + 1 its cos); Marian's table holds every sin, then every
  cos, at the same frequencies and positions. Reordering the model dimension by
  ``dimension_order`` (0, 2, 4, ..., 1, 3, 5, ...) turns our table into Marian's.
  Applied to every vector of the residual stream, the reordering changes no
  computation: each weight that reads the stream has its input columns
  reordered, each that writes it its output rows, LayerNorm's scale and shift
  their entries (its mean and variance do not depend on the order), and the
  attention heads' inner dimensions are untouched. So our weights, so reordered,
  are Marian's model, and back.
- Fused projections: our self-attention projects Q|K|V with one matrix and the
  cross-attention K|V with one; Marian has one per projection (rows split).
- Special ids. Ours are pad 0, unk 1, bos 2, eos 3, and the decoder starts from
  bos. A MarianMT model names its own (OPUS-MT: eos 0, unk 1, pad the last id,
  and the decoder starts from pad). Importing reorders the vocabulary
  (``vocabulary_order``): Marian's start token becomes our <s>, its pad our
  <pad>, its eos and unk ours, the other pieces follow in Marian's order. Where
  the start token is the pad (OPUS-MT), our <pad> is one row more, with zero
  weights and a logit bias of ``NEW_ROW_BIAS``: e^-100 vanishes beside the
  other probabilities in float32, so every log-probability stays Marian's
  (in training, label smoothing adds about 0.1 * 100 / V to the loss: 0.0002
  nats a token with OPUS-MT's 58,000 pieces). Our exports keep our ids.

What neither side can express is refused with the option that stands in the
way (``export_refusals``, ``check_importable``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from transformer.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TransformerConfig

NEW_ROW_BIAS = -100.0

# our activation -> transformers' name, and back (Marian's "swish" is SiLU)
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "swish"}
FROM_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu"}


class MarianError(ValueError):
    """A model one side cannot express, or a folder that is no MarianMT model."""


def dimension_order(d_model: int) -> Tensor:
    """Marian's model dimension j holds our dimension ``order[j]``."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


@dataclass
class _Link:
    """Our tensor and the Marian tensor(s) it is: ``rows`` / ``cols`` say which
    of its axes run along the model dimension (reordered); several Marian names
    split our rows among them (fused projections)."""

    ours: str
    marian: list[str]
    rows: bool = False
    cols: bool = False


def _layer_links(ours: str, marian: str, decoder: bool) -> list[_Link]:
    self_norm = "self_res" if decoder else "attn_res"
    norms = [(self_norm, "self_attn_layer_norm")]
    # projections that read the stream (ours, and Marian's that split it)
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    reads = [("self_attn.qkv_proj", qkv)]
    # projections that write it
    writes = [("self_attn.out_proj", "self_attn.out_proj")]
    if decoder:
        norms.append(("cross_res", "encoder_attn_layer_norm"))
        kv = ["encoder_attn.k_proj", "encoder_attn.v_proj"]
        reads += [("cross_attn.q_proj", ["encoder_attn.q_proj"])]
        reads += [("cross_attn.kv_proj", kv)]
        writes.append(("cross_attn.out_proj", "encoder_attn.out_proj"))
    norms.append(("ffn_res", "final_layer_norm"))
    reads.append(("ffn.fc1", ["fc1"]))
    writes.append(("ffn.fc2", "fc2"))
    links = [
        _Link(f"{ours}.{a}.norm.{p}", [f"{marian}.{b}.{p}"], rows=True)
        for a, b in norms
        for p in ("weight", "bias")
    ]
    for a, bs in reads:  # (out, D): the input columns; the bias is not the stream
        weights = [f"{marian}.{b}.weight" for b in bs]
        links.append(_Link(f"{ours}.{a}.weight", weights, cols=True))
        links.append(_Link(f"{ours}.{a}.bias", [f"{marian}.{b}.bias" for b in bs]))
    for a, b in writes:  # (D, in) and (D,): the output rows
        for p in ("weight", "bias"):
            links.append(_Link(f"{ours}.{a}.{p}", [f"{marian}.{b}.{p}"], rows=True))
    return links


def layer_links(cfg: TransformerConfig) -> list[_Link]:
    """Every layer tensor of a model of ``cfg`` and its Marian name(s)."""
    links = []
    for i in range(cfg.encoder_layers):
        links += _layer_links(f"encoder.{i}", f"model.encoder.layers.{i}", False)
    for i in range(cfg.decoder_layers):
        links += _layer_links(f"decoder.{i}", f"model.decoder.layers.{i}", True)
    return links


def _reorder(t: Tensor, link: _Link, order: Tensor) -> Tensor:
    if link.rows:
        t = t.index_select(0, order)
    if link.cols:
        t = t.index_select(1, order)
    return t


# --- ours -> Marian ---


def export_refusals(cfg: Any) -> list[str]:
    """Why a model of ``cfg`` cannot be a MarianMT model, one line per option."""
    if cfg.arch != "transformer":
        return [
            f"model.arch: {cfg.arch}: MarianMT is the Transformer encoder-decoder "
            "(model.arch: transformer)"
        ]
    out = []
    if cfg.norm_first:
        out.append(
            "model.norm_first: true (pre-norm): MarianMT is post-norm; no "
            "transformers encoder-decoder is pre-norm without an embedding "
            "LayerNorm or other positions"
        )
    if cfg.positional != "sinusoidal":
        out.append(
            f"model.positional: {cfg.positional}: MarianMT computes sinusoidal "
            "positions and stores none"
        )
    if cfg.d_model % 2:
        out.append(f"model.d_model: {cfg.d_model}: an odd width has no exact map")
    return out


def marian_config(cfg: TransformerConfig) -> dict[str, Any]:
    """``MarianConfig`` keyword arguments for a model of ``cfg`` (our ids)."""
    return {
        "vocab_size": cfg.src_vocab_size,
        "decoder_vocab_size": cfg.tgt_vocab_size,
        "share_encoder_decoder_embeddings": cfg.tie_src_tgt_embeddings,
        "tie_word_embeddings": cfg.tie_output_embeddings,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.encoder_layers,
        "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff,
        "activation_function": ACTIVATIONS[cfg.activation],
        "max_position_embeddings": cfg.max_positions,
        "scale_embedding": True,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": 0.0,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
        "decoder_start_token_id": BOS_ID,
        "forced_eos_token_id": EOS_ID,
    }


def to_marian(state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Our state dict -> a ``MarianMTModel`` state dict (every tied name set)."""
    order = dimension_order(cfg.d_model)
    out: dict[str, Tensor] = {}
    for link in layer_links(cfg):
        parts = _reorder(state[link.ours], link, order).chunk(len(link.marian))
        for name, part in zip(link.marian, parts, strict=True):
            out[name] = part.contiguous()
    tgt = state["tgt_embed.weight"][:, order].contiguous()
    src = tgt
    if not cfg.tie_src_tgt_embeddings:
        src = state["src_embed.weight"][:, order].contiguous()
    else:
        out["model.shared.weight"] = tgt
    out["model.encoder.embed_tokens.weight"] = src
    out["model.decoder.embed_tokens.weight"] = tgt
    if cfg.tie_output_embeddings:
        out["lm_head.weight"] = tgt
    else:
        out["lm_head.weight"] = state["output_proj.weight"][:, order].contiguous()
    bias = state.get("final_logits_bias")
    if bias is None:
        bias = torch.zeros(cfg.tgt_vocab_size, dtype=tgt.dtype)
    out["final_logits_bias"] = bias.reshape(1, -1).clone()
    return out


# --- Marian -> ours ---


def check_importable(config: dict[str, Any], where: str) -> None:
    """Refuse a MarianMT ``config.json`` our Transformer cannot hold exactly."""
    problems = []
    if not config.get("scale_embedding", False):
        problems.append(
            "scale_embedding: false (our embeddings are always scaled by sqrt(d_model))"
        )
    for a, b in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if config.get(a) != config.get(b):
            problems.append(
                f"{a} {config.get(a)} != {b} {config.get(b)} (one value for both)"
            )
    activation = config.get("activation_function", "gelu")
    if activation not in FROM_HF_ACTIVATIONS:
        choices = ", ".join(FROM_HF_ACTIVATIONS)
        problems.append(f"activation_function: {activation!r} (one of {choices})")
    if config.get("d_model", 0) % 2:
        problems.append(f"d_model: {config.get('d_model')} (odd: no exact map)")
    if problems:
        raise MarianError(
            f"{where}: this MarianMT model cannot be held exactly: "
            + "; ".join(problems)
        )


def imported_config(
    config: dict[str, Any], src_size: int, tgt_size: int, bias: bool
) -> TransformerConfig:
    """Our model config for a MarianMT ``config.json`` (checked before) whose
    vocabularies, reordered, have ``src_size`` / ``tgt_size`` pieces."""
    return TransformerConfig(
        src_vocab_size=src_size,
        tgt_vocab_size=tgt_size,
        d_model=config["d_model"],
        n_heads=config["encoder_attention_heads"],
        encoder_layers=config["encoder_layers"],
        decoder_layers=config["decoder_layers"],
        d_ff=config["encoder_ffn_dim"],
        dropout=float(config.get("dropout", 0.1)),
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        activation=FROM_HF_ACTIVATIONS[config.get("activation_function", "gelu")],
        norm_first=False,
        positional="sinusoidal",
        max_positions=config.get("max_position_embeddings", 1024),
        tie_src_tgt_embeddings=config.get("share_encoder_decoder_embeddings", True),
        tie_output_embeddings=config.get("tie_word_embeddings", True),
        final_logits_bias=bias,
    )


@dataclass
class VocabularyOrder:
    """Our id j is Marian's id ``rows[j]`` (-1: a new row), named ``pieces[j]``."""

    rows: list[int]
    pieces: list[str]

    def take(self, t: Tensor, fill: float = 0.0) -> Tensor:
        """Rows of ``t`` (Marian's order along dim 0) in our order; new rows
        hold ``fill``."""
        index = torch.tensor([max(r, 0) for r in self.rows])
        out = t.index_select(0, index).clone()
        new = torch.tensor([r < 0 for r in self.rows])
        out[new] = fill
        return out


def vocabulary_order(
    pieces: list[str], pad: int, unk: int, eos: int, start: int, where: str
) -> VocabularyOrder:
    """Our order of a Marian vocabulary (``pieces`` by Marian id) with its
    special ids: start -> <s>, pad -> <pad> (a new row when it is the start),
    unk, eos; the others after them in Marian's order."""
    specials = {PAD_ID: -1 if pad == start else pad, UNK_ID: unk, BOS_ID: start}
    specials[EOS_ID] = eos
    used = [r for r in specials.values() if r >= 0]
    if len(set(used)) != len(used) or not all(0 <= r < len(pieces) for r in used):
        raise MarianError(
            f"{where}: special ids pad {pad}, unk {unk}, eos {eos}, decoder start "
            f"{start}: each must be a different piece of the {len(pieces)}"
        )
    rows = [specials[i] for i in range(4)]
    rows += [i for i in range(len(pieces)) if i not in used]
    names = ["<pad>", "<unk>", "<s>", "</s>"]
    return VocabularyOrder(rows, names + [pieces[r] for r in rows[4:]])


def from_marian(
    weights: dict[str, Tensor],
    config: dict[str, Any],
    src: VocabularyOrder,
    tgt: VocabularyOrder,
    where: str,
) -> tuple[dict[str, Tensor], TransformerConfig]:
    """A MarianMT state dict -> our state dict and model config (vocabularies in
    our order); a missing tensor is a ``MarianError`` naming it."""
    shared = config.get("share_encoder_decoder_embeddings", True)

    def get(*names: str) -> Tensor:
        for name in names:
            if name in weights:
                return weights[name].float()
        raise MarianError(f"{where}: the weights have no {names[0]}")

    enc_embed = get("model.encoder.embed_tokens.weight", "model.shared.weight")
    dec_embed = get("model.decoder.embed_tokens.weight", "model.shared.weight")
    if shared:
        enc_embed = dec_embed = get(
            "model.shared.weight",
            "model.encoder.embed_tokens.weight",
            "model.decoder.embed_tokens.weight",
        )
    tied_output = config.get("tie_word_embeddings", True)
    lm_head = dec_embed if tied_output else get("lm_head.weight")
    size = dec_embed.size(0)
    bias = weights.get("final_logits_bias", torch.zeros(1, size)).float().reshape(-1)
    new_bias = tgt.take(bias, NEW_ROW_BIAS)
    has_bias = bool(new_bias.any())
    cfg = imported_config(config, len(src.rows), len(tgt.rows), has_bias)
    order = dimension_order(cfg.d_model)
    back = torch.argsort(order)  # our dimension i is Marian's back[i]
    state: dict[str, Tensor] = {}
    for link in layer_links(cfg):
        fused = torch.cat([get(name) for name in link.marian])
        state[link.ours] = _reorder(fused, link, back).contiguous()
    state["tgt_embed.weight"] = tgt.take(dec_embed)[:, back].contiguous()
    if shared:
        state["src_embed.weight"] = state["tgt_embed.weight"]
    else:
        state["src_embed.weight"] = src.take(enc_embed)[:, back].contiguous()
    if not tied_output:
        state["output_proj.weight"] = tgt.take(lm_head)[:, back].contiguous()
    if has_bias:
        state["final_logits_bias"] = new_bias
    return state, cfg

"""Writing a checkpoint as a CTranslate2 model directory (``transformer-export``).

What the export spells out, because CTranslate2's defaults differ from ours:

- Positions: our sinusoids interleave sin/cos (even/odd dimensions) and start at
  position 0; CTranslate2's built-in table concatenates [sin | cos] and starts at 1.
  The export therefore always writes our table (sinusoidal or learned) as
  ``position_encodings/encodings``; it also caps the input length at
  ``model.max_positions``.
- Special tokens: our ids are pad=0, unk=1, bos=2, eos=3, whose SentencePiece pieces
  (normally ``<pad> <unk> <s> </s>``) become CTranslate2's unk, bos (the decoder start
  token) and eos tokens. Our sources end with <eos>, so the config sets
  ``add_source_eos``: callers pass pieces without ``</s>``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer import __version__
from transformer.checkpoint import WEIGHTS
from transformer.config import DataConfig, DecodingConfig, ModelConfig
from transformer.export.common import (
    EXPORT_INFO,
    ExportError,
    check_output_folder,
    import_ctranslate2,
    write_folder,
)
from transformer.loading import load_model
from transformer.models import Transformer
from transformer.tokenizer import SPECIAL_IDS, Tokenizer

log = logging.getLogger(__name__)


def quantizations() -> tuple[str, ...]:
    """Weight types that ``spec.optimize(quantization=...)`` accepts."""
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

    return tuple(ACCEPTED_MODEL_TYPES)


# this toolkit's short names (--precision bf16) for CTranslate2's weight types
_SHORT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def quantization_name(quantization: str | None) -> str | None:
    """CTranslate2's name for a weight type given as ours (``bf16``,
    ``int8_bf16``) or as its own (``bfloat16``)."""
    if quantization is None:
        return None
    head, _, tail = quantization.rpartition("_")
    tail = _SHORT.get(tail, tail)
    return f"{head}_{tail}" if head else tail


# --- building the specification ---


def _array(tensor):
    """A float32 numpy copy of a parameter or buffer."""
    return tensor.detach().cpu().float().numpy().copy()


def _set_linear(spec, linear) -> None:
    spec.weight = _array(linear.weight)  # (out, in), the layout CTranslate2 expects
    if linear.bias is not None:
        spec.bias = _array(linear.bias)


def _set_norm(spec, norm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def _layer_norm_epsilon(model: Transformer) -> float:
    """The one epsilon of every LayerNorm (CTranslate2 has a single setting)."""
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ExportError(f"LayerNorms use several epsilons {sorted(eps)}")
    return eps.pop()


def _special_pieces(tokenizer: Tokenizer) -> dict[str, str]:
    """Pieces of pad/unk/bos/eos, which must be the same on both sides."""
    pieces = {}
    for name, i in SPECIAL_IDS.items():
        src, tgt = tokenizer.src.id_to_piece(i), tokenizer.tgt.id_to_piece(i)
        if src != tgt:
            raise ExportError(
                f"the source and target SentencePiece models name the {name} token "
                f"differently ({src!r}, {tgt!r}); CTranslate2 needs one name"
            )
        pieces[name] = src
    return pieces


def _pieces(sp, expected: int, side: str) -> list[str]:
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    if len(pieces) != expected:
        raise ExportError(
            f"the {side} SentencePiece model has {len(pieces)} pieces but the model's "
            f"{side} vocabulary has {expected}"
        )
    return pieces


def build_spec(model: Transformer, tokenizer: Tokenizer, tag_starts: bool = False):
    """A validated ``ctranslate2.specs.TransformerSpec`` holding ``model``'s
    weights; ``tag_starts``: the decoder starts from a language tag given as the
    target prefix (``data.tag: target``), not from <bos>."""
    import_ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec

    cfg: ModelConfig = model.cfg
    activations = {
        "relu": common_spec.Activation.RELU,
        "gelu": common_spec.Activation.GELU,  # erf form, as F.gelu's default
        "silu": common_spec.Activation.SWISH,  # x * sigmoid(x)
    }
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.encoder_layers, cfg.decoder_layers),
        cfg.n_heads,
        pre_norm=cfg.norm_first,
        activation=activations[cfg.activation],
        # return_attention gives the last layer's cross-attention averaged over
        # every head, as transformer-translate --alignment aligns by default
        alignment_layer=-1,
        alignment_heads=cfg.n_heads,
    )
    special = _special_pieces(tokenizer)
    spec.config.unk_token = special["unk"]
    spec.config.bos_token = special["bos"]
    spec.config.eos_token = special["eos"]
    # None: CTranslate2 starts the decoder from the first target prefix token
    spec.config.decoder_start_token = None if tag_starts else special["bos"]
    spec.config.add_source_bos = False
    spec.config.add_source_eos = True
    spec.config.layer_norm_epsilon = _layer_norm_epsilon(model)
    spec.register_source_vocabulary(
        _pieces(tokenizer.src, cfg.src_vocab_size, "source")
    )
    spec.register_target_vocabulary(
        _pieces(tokenizer.tgt, cfg.tgt_vocab_size, "target")
    )

    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = _array(model.src_embed.weight)
    dec.embeddings.weight = _array(model.tgt_embed.weight)
    enc.scale_embeddings = dec.scale_embeddings = True  # times sqrt(d_model)
    for side, pos in ((enc, model.src_pos), (dec, model.tgt_pos)):
        table = pos.table if pos.learned is None else pos.learned.weight
        side.position_encodings.encodings = _array(table)  # (max_positions, D)
    if model.encoder_norm is not None:
        _set_norm(enc.layer_norm, model.encoder_norm)
        _set_norm(dec.layer_norm, model.decoder_norm)
    output = model.tgt_embed if model.output_proj is None else model.output_proj
    dec.projection.weight = _array(output.weight)  # (V_tgt, D)
    if model.final_logits_bias is not None:
        dec.projection.bias = _array(model.final_logits_bias)

    for layer_spec, layer in zip(enc.layer, model.encoder, strict=True):
        attn = layer_spec.self_attention
        _set_norm(attn.layer_norm, layer.attn_res.norm)
        _set_linear(attn.linear[0], layer.self_attn.qkv_proj)  # fused Q|K|V
        _set_linear(attn.linear[1], layer.self_attn.out_proj)
        _set_norm(layer_spec.ffn.layer_norm, layer.ffn_res.norm)
        _set_linear(layer_spec.ffn.linear_0, layer.ffn.fc1)
        _set_linear(layer_spec.ffn.linear_1, layer.ffn.fc2)
    for layer_spec, layer in zip(dec.layer, model.decoder, strict=True):
        attn = layer_spec.self_attention
        _set_norm(attn.layer_norm, layer.self_res.norm)
        _set_linear(attn.linear[0], layer.self_attn.qkv_proj)  # fused Q|K|V
        _set_linear(attn.linear[1], layer.self_attn.out_proj)
        cross = layer_spec.attention
        _set_norm(cross.layer_norm, layer.cross_res.norm)
        _set_linear(cross.linear[0], layer.cross_attn.q_proj)
        _set_linear(cross.linear[1], layer.cross_attn.kv_proj)  # fused K|V
        _set_linear(cross.linear[2], layer.cross_attn.out_proj)
        _set_norm(layer_spec.ffn.layer_norm, layer.ffn_res.norm)
        _set_linear(layer_spec.ffn.linear_0, layer.ffn.fc1)
        _set_linear(layer_spec.ffn.linear_1, layer.ffn.fc2)
    spec.validate()
    return spec


# --- writing the export ---


def _check_options(output: Path, quantization: str | None, force: bool) -> None:
    if quantization is not None and quantization_name(quantization) not in (
        quantizations()
    ):
        choices = ", ".join(quantizations())
        raise ExportError(f"--quantization {quantization}: must be one of {choices}")
    check_output_folder(output, force)


def export_model(
    model: Transformer,
    tokenizer: Tokenizer,
    output: str | Path,
    quantization: str | None = None,
    force: bool = False,
    decoding: DecodingConfig | None = None,
    source: dict[str, Any] | None = None,
    data: DataConfig | None = None,
) -> Path:
    """Write ``model`` as a CTranslate2 model directory ``output``.

    Args:
        model: the Transformer (its weights are read, not changed).
        tokenizer: its SentencePiece model(s), copied into ``output``.
        output: the folder to create; the files are written to a temporary sibling
            folder first and renamed into place, so a failure leaves no half export.
        quantization: a CTranslate2 weight type (``int8``, ``int8_float32``,
            ``bfloat16`` or ``bf16``, ...); None keeps float32 weights.
        force: replace ``output`` if it is an earlier export (or empty).
        decoding: search defaults recorded in ``export.json``.
        source: provenance recorded in ``export.json`` (checkpoint, step).
        data: the languages it translates (with ``data.pairs``, the tags), recorded
            in ``export.json`` for ``ExportedModel.direction``.
    """
    if not isinstance(model, Transformer):
        named = f"{source['checkpoint']}: " if source and "checkpoint" in source else ""
        raise ExportError(
            f"{named}model.arch: {model.cfg.arch} cannot be exported; CTranslate2's "
            "TransformerSpec holds the transformer encoder-decoder only"
        )
    ct2 = import_ctranslate2()
    output = Path(output)
    _check_options(output, quantization, force)
    quantization = quantization_name(quantization)
    tag_starts = data is not None and data.multilingual and data.tag == "target"
    spec = build_spec(model, tokenizer, tag_starts)
    spec.optimize(quantization=quantization)  # aliases tied weights, then quantizes

    def fill(staging: Path) -> None:
        spec.save(str(staging))
        files = [p.name for p in tokenizer.save(staging)]
        info = _export_info(model, tokenizer, files, quantization, decoding, source)
        if data is not None:
            info["languages"] = {
                "src_lang": data.src_lang,
                "tgt_lang": data.tgt_lang,
                "pairs": data.pairs,
                "tag": data.tag,
            }
            if tag_starts:
                info["decoder_start_token"] = None
        info["ctranslate2_version"] = ct2.__version__
        (staging / EXPORT_INFO).write_text(
            json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    write_folder(output, fill)
    log.info("exported to %s (quantization %s)", output, quantization or "none")
    return output


def _export_info(
    model: Transformer,
    tokenizer: Tokenizer,
    files: list[str],
    quantization: str | None,
    decoding: DecodingConfig | None,
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    special = _special_pieces(tokenizer)
    src_model, tgt_model = (files[0], files[0]) if tokenizer.joint else files
    decoding = decoding or DecodingConfig()
    return {
        "format": "ctranslate2-transformer",
        "exported_by": f"transformer-nmt {__version__}",
        **(source or {}),
        "quantization": quantization,
        "tokenizer": {
            "joint": tokenizer.joint,
            "source_model": src_model,
            "target_model": tgt_model,
            # the pieces' ids, where they are not the models' own (MarianMT's)
            **({"vocab": "vocab.json"} if tokenizer.vocab else {}),
            **({"tgt_vocab": "tgt_vocab.json"} if tokenizer.tgt_vocab else {}),
            "hash": tokenizer.hash(),
        },
        "special_tokens": {
            name: {"id": i, "piece": special[name]} for name, i in SPECIAL_IDS.items()
        },
        "source_suffix": special["eos"],
        "decoder_start_token": special["bos"],
        "suppress_tokens": [special["pad"], special["bos"]],
        "max_positions": model.cfg.max_positions,
        # what return_attention gives (older exports: head 0 of the last layer)
        "alignment": {"layer": -1, "heads": model.cfg.n_heads},
        "model": asdict(model.cfg),
        "decoding": {
            key: getattr(decoding, key)
            for key in (
                "strategy",
                "beam_size",
                "length_penalty",
                "max_len_a",
                "max_len_b",
                "min_len",
            )
        },
        "usage": (
            "from transformer.export import translate_with_ctranslate2; "
            "translate_with_ctranslate2(DIR, ['a sentence'], beam_size=5). "
            "Raw CTranslate2: ctranslate2.Translator(DIR).translate_batch(pieces, "
            "min_decoding_length=0, max_decoding_length=<at most max_positions>, "
            "suppress_sequences=[[pad], [bos]]) with pieces from the SentencePiece "
            "source model, without </s> (it is added)."
        ),
    }


def _stored_in_half(ckpt: dict[str, Any], weights: str) -> bool:
    state = ckpt["ema" if weights == "ema" else "model"]
    return any(v.dtype == torch.float16 for v in state.values())


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    quantization: str | None = None,
    force: bool = False,
    weights: str = "raw",
) -> Path:
    """Export a checkpoint of this toolkit (see ``export_model``); ``weights``:
    the trained ones (``raw``) or their moving average (``ema``)."""
    import_ctranslate2()  # fail before the (slower) checkpoint load
    _check_options(Path(output), quantization, force)
    model, cfg, tokenizer, ckpt = load_model(checkpoint, weights=weights)
    if quantization is None and _stored_in_half(ckpt, weights):
        quantization = "float16"  # a published (--half) file stays half the size
        log.info(
            "%s holds float16 weights: exporting float16 (--quantization float32 "
            "for float32)",
            checkpoint,
        )
    step = ckpt.get("step")
    source = {"checkpoint": str(checkpoint), "step": step, "weights": weights}
    return export_model(
        model, tokenizer, output, quantization, force, cfg.decoding, source, cfg.data
    )


# --- command line ---


def _export(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="transformer-export",
        description="Export a checkpoint to a CTranslate2 model directory, or to a "
        "transformers MarianMT folder (--format hf).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint (.pt, .safetensors, or a transformers MarianMT folder or "
        "Hub name)",
    )
    parser.add_argument("--output", required=True, help="the folder to create")
    parser.add_argument(
        "--format",
        choices=("ctranslate2", "hf"),
        default="ctranslate2",
        help="ctranslate2: a CTranslate2 model; hf: a transformers MarianMT folder "
        "with a model card (the hf extra)",
    )
    parser.add_argument(
        "--results",
        nargs="*",
        help="--format hf: results files whose rows of this checkpoint the model "
        "card quotes (default: results/*.json)",
    )
    parser.add_argument(
        "--quantization",
        help="weight type: int8, int8_float32, int8_bfloat16, bfloat16 (or bf16), "
        "float16 (fp16), float32 (fp32), ... (default: the checkpoint's own: "
        "float32, or float16 for a file written with --half)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier export in --output"
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="raw",
        help="raw: the trained weights; ema: their moving average",
    )
    args = parser.parse_args(argv)
    from transformer.cli.common import setup_logging

    setup_logging()
    if args.format == "hf":
        from transformer.hf.exporting import export_hf_checkpoint

        if args.quantization is not None:
            raise ExportError("--quantization: for CTranslate2 exports only")
        results = None if args.results is None else [Path(p) for p in args.results]
        out = export_hf_checkpoint(
            args.checkpoint, args.output, args.force, args.weights, results
        )
        print(out)
        return 0
    if args.results is not None:
        raise ExportError("--results: for --format hf only")
    out = export_checkpoint(
        args.checkpoint, args.output, args.quantization, args.force, args.weights
    )
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``transformer-export``: user errors print one ``error:`` line, exit 2."""
    from transformer.cli.common import run_cli

    return run_cli(_export, argv, (ExportError,))

"""``transformer-export --format hf``: a checkpoint as a transformers MarianMT
folder, which ``MarianMTModel.from_pretrained``, ``MarianTokenizer.from_pretrained``
and ``pipeline("translation", model=DIR)`` load.

The folder holds what ``save_pretrained`` writes (``config.json``,
``model.safetensors``, ``generation_config.json``), MarianTokenizer's files (our
SentencePiece model(s) as ``source.spm`` / ``target.spm``, the ids as
``vocab.json``, and ``target_vocab.json`` for separate vocabularies), the
resolved config (``transformer-nmt.yaml``), ``export.json`` (provenance, read
back on import) and a model card (``README.md``).

The weights map exactly (``marian``); the generation config holds our search
defaults as far as transformers can say them: the beam, the tokens never
emitted (<pad>, <s>), <eos> forced at the length limit, and stopping once
``num_beams`` hypotheses have finished (``early_stopping``). Two things have no
exact counterpart there: our per-sentence length limit (``max_len_a`` *
source + ``max_len_b``; transformers has one limit for all, set to
``model.max_positions``) and GNMT's length penalty ((5 + |Y|) / 6) ** alpha
(transformers divides by |Y| ** beta; ``length_penalty`` is the beta whose
slope matches at 15 tokens). With a length penalty of 0 on both sides, greedy
and beam search give the same hypotheses here and in transformers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformer import __version__
from transformer.config import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    Config,
    DecodingConfig,
    save_config,
)
from transformer.export.common import (
    EXPORT_INFO,
    ExportError,
    check_output_folder,
    write_folder,
)
from transformer.files import sha256_of
from transformer.hf.marian import export_refusals, marian_config, to_marian
from transformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

HF_FORMAT = "transformers-marian"  # export.json's "format"
INSTALL_HINT = 'pip install -e ".[hf]"'
CONFIG_FILE = "transformer-nmt.yaml"
TYPICAL_LENGTH = 15  # target tokens where the length penalties' slopes agree


def import_transformers():
    """The ``transformers`` module, or an ``ExportError`` saying how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ExportError(
            f"transformers is not installed ({e}); install it with {INSTALL_HINT}"
        ) from None
    return transformers


def transformers_major() -> int:
    """The major version of the installed transformers."""
    return int(import_transformers().__version__.split(".")[0])


def check_exportable(cfg: Config, named: str) -> None:
    """Refuse a model MarianMT cannot hold, naming each option and the ways on."""
    problems = export_refusals(cfg.model)
    if cfg.data.pairs:
        problems.append(
            "data.pairs: a multilingual model's language tags have no MarianMT "
            "tokenizer counterpart here"
        )
    if problems:
        raise ExportError(
            f"{named}: cannot be a MarianMT model: {'; '.join(problems)}. Export it "
            "to CTranslate2 instead (transformer-export without --format hf), or "
            "train a post-norm model with sinusoidal positions, such as "
            "configs/multi30k_de_en_marian.yaml"
        )


def hf_length_penalty(alpha: float) -> float:
    """transformers' ``length_penalty`` (score / |Y| ** beta) that stands in for
    GNMT's alpha: the slope of alpha * log((5 + |Y|) / 6) against log |Y| at
    ``TYPICAL_LENGTH`` tokens."""
    return alpha * TYPICAL_LENGTH / (5.0 + TYPICAL_LENGTH)


def generation_settings(decoding: DecodingConfig, max_positions: int) -> dict:
    """``GenerationConfig`` keyword arguments holding our search defaults."""
    settings: dict[str, Any] = {
        "decoder_start_token_id": BOS_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "forced_eos_token_id": EOS_ID,  # ours ends with <eos> at the limit
        "bad_words_ids": [[PAD_ID], [BOS_ID]],  # ours never emits them
        # the decoder start token counts: ours makes max_positions tokens at most
        "max_length": max_positions + 1,
    }
    if decoding.strategy == "beam":
        settings.update(
            num_beams=decoding.beam_size,
            num_return_sequences=1,
            early_stopping=True,  # stop once num_beams have finished, as ours
            length_penalty=hf_length_penalty(decoding.length_penalty),
        )
    elif decoding.strategy == "sample":
        settings.update(
            do_sample=True,
            temperature=decoding.temperature,
            top_k=decoding.top_k,
            top_p=decoding.top_p,
        )
    else:
        settings.update(num_beams=1, do_sample=False)
    return settings


def result_rows(checkpoint: str | Path, results: list[Path]) -> list[dict]:
    """The single-model rows of the results files that name ``checkpoint`` (by
    its sha256)."""
    if not Path(checkpoint).is_file():
        return []
    digest = sha256_of(checkpoint)
    rows = []
    for path in results:
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("%s: not readable JSON; its results are left out", path)
            continue
        for row in table.get("rows", []):
            files = row.get("checkpoints", [])
            if len(files) == 1 and files[0].get("sha256") == digest:
                rows.append(row)
    return rows


def default_results() -> list[Path]:
    """``results/*.json`` of the working folder."""
    return sorted(Path("results").glob("*.json"))


def _data_lines(cfg: Config) -> list[str]:
    d = cfg.data
    where = d.hub_name or d.source_url or d.dir or d.format
    lines = [
        f"- Languages: {d.src_lang} -> {d.tgt_lang}.",
        f"- Corpus: `{where}` ({d.format}); training split `{d.train_split}`, "
        f"validation `{d.valid_split}`, test `{d.test_split}`.",
    ]
    if d.source_files:
        names = ", ".join(f"`{name}`" for name in d.source_files)
        lines.append(f"- Files (checked by sha256 when downloaded): {names}.")
    if d.train:
        lines.append(f"- {len(d.train)} training corpora (see `{CONFIG_FILE}`).")
    lines.append(
        f"- Training pairs kept: at most {d.max_length} pieces a side, a length "
        f"ratio of at most {d.max_length_ratio}."
    )
    return lines


def _results_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return [
            "No scores are recorded for this checkpoint (no `results/*.json` row "
            "names its file by sha256)."
        ]
    lines = [
        "Scored with transformer-nmt's own search (GNMT length penalty) by "
        "sacreBLEU; transformers' `generate` searches a little differently (see "
        "Use), so its scores may differ slightly.",
        "",
        "| row | test split | BLEU | chrF | BLEU (lowercased) | beam | alpha |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        t = row["test"]
        lines.append(
            f"| {row['row']} | {row['test_split']} | {t['bleu']:.2f} | "
            f"{t['chrf']:.2f} | {t['bleu_lc']:.2f} | {row['beam']} | "
            f"{row['alpha']} |"
        )
    for row in rows:
        t = row["test"]
        lines += [
            "",
            f"{row['row']}: chosen as: {row.get('valid_split', 'val')} BLEU "
            f"{row.get('valid_bleu_chosen', float('nan')):.2f} with beam "
            f"{row['beam']}, alpha {row['alpha']}. Signatures:",
            "",
            f"- BLEU `{t['bleu_signature']}`",
            f"- chrF `{t['chrf_signature']}`",
            f"- BLEU lowercased `{t['bleu_lc_signature']}`",
            "",
            "Reproduce (transformer-nmt, from its repository):",
            "",
            "```bash",
            row["command"],
            "```",
        ]
    return lines


def model_card(
    cfg: Config, tokenizer: Tokenizer, source: dict[str, Any], rows: list[dict]
) -> str:
    """The README.md of an export: data, training, scores, use and limits."""
    m, d = cfg.model, cfg.data
    gen = generation_settings(cfg.decoding, m.max_positions)
    search = f"beam {gen['num_beams']}" if gen.get("num_beams", 1) > 1 else "greedy"
    if gen.get("do_sample"):
        search = "sampling"
    provenance = [f"- Checkpoint: `{source.get('checkpoint')}`"]
    if source.get("step") is not None:
        provenance.append(f"- Updates: {source['step']}; weights: {source['weights']}")
    if source.get("averaged_from"):
        files = ", ".join(f"`{p}`" for p in source["averaged_from"])
        provenance.append(f"- Averaged from: {files}")
    if source.get("imported_from"):
        provenance.append(f"- Imported from: `{source['imported_from']}`")
    vocab = (
        f"one vocabulary of {m.src_vocab_size} pieces"
        if tokenizer.shared_vocabulary
        else f"{m.src_vocab_size} source and {m.tgt_vocab_size} target pieces"
    )
    lines = [
        "---",
        f"language: [{d.src_lang}, {d.tgt_lang}]",
        "tags: [translation, marian, transformer-nmt]",
        "library_name: transformers",
        "pipeline_tag: translation",
        "---",
        "",
        f"# {d.src_lang} -> {d.tgt_lang} translation (transformer-nmt, MarianMT)",
        "",
        "A Transformer trained with transformer-nmt and exported by "
        "`transformer-export --format hf` to transformers' MarianMT architecture. "
        "The export is exact: the same weights, reordered, compute the same "
        "probabilities.",
        "",
        "## Model",
        "",
        f"- Post-norm encoder-decoder: d_model {m.d_model}, {m.encoder_layers} + "
        f"{m.decoder_layers} layers, {m.n_heads} heads, feed-forward {m.d_ff} "
        f"({m.activation}), sinusoidal positions (at most {m.max_positions}).",
        f"- SentencePiece: {vocab}; embeddings "
        + ("shared by both sides" if m.tie_src_tgt_embeddings else "per side")
        + (", tied to the output layer." if m.tie_output_embeddings else "."),
        *provenance,
        "",
        "## Use",
        "",
        "```python",
        "from transformers import MarianMTModel, MarianTokenizer",
        "",
        'tokenizer = MarianTokenizer.from_pretrained("PATH_OR_HUB_NAME")',
        'model = MarianMTModel.from_pretrained("PATH_OR_HUB_NAME")',
        'batch = tokenizer(["..."], return_tensors="pt", padding=True)',
        "print(tokenizer.batch_decode(model.generate(**batch), "
        "skip_special_tokens=True))",
        "```",
        "",
        'With transformers 4, `pipeline("translation", model="PATH_OR_HUB_NAME")` '
        "does the same (transformers 5 removed that pipeline).",
        "",
        f"`generation_config.json` holds transformer-nmt's search defaults: {search}, "
        "never emitting `<pad>` or `<s>`, `</s>` forced at the length limit, "
        "stopping once the beam holds as many finished hypotheses. transformers "
        f"has one length limit ({m.max_positions} tokens) where transformer-nmt "
        f"allows {cfg.decoding.max_len_a} x source length + "
        f"{cfg.decoding.max_len_b}, and divides by |Y| ** length_penalty where "
        f"transformer-nmt uses GNMT's ((5 + |Y|) / 6) ** {cfg.decoding.length_penalty}"
        " (the `length_penalty` here has the same slope at 15 tokens). With a "
        "length penalty of 0 on both sides the two give the same output.",
        "",
        "## Data",
        "",
        *_data_lines(cfg),
        "",
        "## Training",
        "",
        f"The resolved configuration is `{CONFIG_FILE}` in this folder; with "
        "transformer-nmt installed (and the corpus where `data.dir` says, or "
        "downloadable from `data.source_url`), this trains the model again:",
        "",
        "```bash",
        f"transformer-train --config {CONFIG_FILE}",
        "```",
        "",
        "## Results",
        "",
        *_results_lines(rows),
        "",
        "## Intended use and limits",
        "",
        f"Research, teaching and comparison of translation systems on {d.src_lang} "
        f"-> {d.tgt_lang} text like its training data "
        f"(`{d.hub_name or d.source_url or d.dir or d.format}`). It has not been "
        "evaluated outside "
        "that domain, nor for bias, toxicity or factual faithfulness; do not use "
        "it where a wrong translation can cause harm without a human check.",
        "",
    ]
    return "\n".join(lines)


def export_hf(
    model: Any,
    tokenizer: Tokenizer,
    cfg: Config,
    output: str | Path,
    force: bool = False,
    source: dict[str, Any] | None = None,
    results: list[dict] | None = None,
) -> Path:
    """Write ``model`` (its config ``cfg``) as a transformers MarianMT folder.

    Args:
        source: provenance for ``export.json`` and the card (checkpoint, step).
        results: results rows (``results/*.json``) of this model, for the card.
    """
    source = source or {}
    check_exportable(cfg, str(source.get("checkpoint", "the model")))
    output = Path(output)
    check_output_folder(output, force)
    transformers = import_transformers()
    m = cfg.model
    if m.src_vocab_size != m.tgt_vocab_size and transformers_major() < 5:
        raise ExportError(
            f"transformers {transformers.__version__} sizes MarianMT's decoder "
            f"embedding by the source vocabulary ({m.src_vocab_size} pieces), so it "
            f"cannot hold a target vocabulary of {m.tgt_vocab_size}; export with "
            "transformers 5 or later, which can"
        )
    from transformers import (
        GenerationConfig,
        MarianConfig,
        MarianMTModel,
        MarianTokenizer,
    )

    hf = MarianMTModel(MarianConfig(**marian_config(cfg.model))).eval()
    state = to_marian(
        {k: v.detach().cpu().float() for k, v in model.state_dict().items()},
        cfg.model,
    )
    missing, unexpected = hf.load_state_dict(state, strict=False)
    computed = {f"model.{s}.embed_positions.weight" for s in ("encoder", "decoder")}
    if set(missing) - computed or unexpected:  # a transformers version we miss
        raise ExportError(
            f"transformers {transformers.__version__}'s MarianMTModel has other "
            f"weights (missing {sorted(set(missing) - computed)}, unexpected "
            f"{sorted(unexpected)})"
        )
    hf.generation_config = GenerationConfig(
        **generation_settings(cfg.decoding, cfg.model.max_positions)
    )

    def fill(staging: Path) -> None:
        hf.save_pretrained(staging)
        (staging / "source.spm").write_bytes(tokenizer.src_proto)
        (staging / "target.spm").write_bytes(tokenizer.tgt_proto or tokenizer.src_proto)
        vocabs = {"vocab.json": tokenizer.src}
        if not tokenizer.shared_vocabulary:
            vocabs["target_vocab.json"] = tokenizer.tgt
        for name, side in vocabs.items():
            pieces = {side.id_to_piece(i): i for i in range(side.vocab_size())}
            (staging / name).write_text(
                json.dumps(pieces, ensure_ascii=False, indent=1), encoding="utf-8"
            )
        separate = not tokenizer.shared_vocabulary
        MarianTokenizer(
            str(staging / "source.spm"),
            str(staging / "target.spm"),
            str(staging / "vocab.json"),
            target_vocab_file=str(staging / "target_vocab.json") if separate else None,
            separate_vocabs=separate,
            source_lang=cfg.data.src_lang,
            target_lang=cfg.data.tgt_lang,
            model_max_length=cfg.model.max_positions,
        ).save_pretrained(staging)
        save_config(cfg, staging / CONFIG_FILE)
        info = {
            "format": HF_FORMAT,
            "exported_by": f"transformer-nmt {__version__}",
            "transformers_version": transformers.__version__,
            **source,
            "config": cfg.to_dict(),
        }
        (staging / EXPORT_INFO).write_text(
            json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        card = model_card(cfg, tokenizer, source, results or [])
        (staging / "README.md").write_text(card, encoding="utf-8")

    write_folder(output, fill)
    log.info("exported to %s (transformers MarianMT)", output)
    return output


def export_hf_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    force: bool = False,
    weights: str = "raw",
    results: list[Path] | None = None,
) -> Path:
    """Export a checkpoint (any ``load_checkpoint`` reads) as a MarianMT folder
    (``export_hf``); ``results``: the results files whose rows of this checkpoint
    the card quotes (default ``results/*.json``)."""
    from transformer.loading import load_model

    import_transformers()  # fail before the (slower) checkpoint load
    check_output_folder(Path(output), force)
    model, cfg, tokenizer, ckpt = load_model(checkpoint, weights=weights)
    source = {"checkpoint": str(checkpoint), "step": ckpt.get("step")}
    source["weights"] = ckpt.get("weights", weights) if weights == "raw" else weights
    for key in ("averaged_from", "averaged_steps", "imported_from"):
        if key in ckpt:
            source[key] = ckpt[key]
    rows = result_rows(checkpoint, default_results() if results is None else results)
    return export_hf(model, tokenizer, cfg, output, force, source, rows)

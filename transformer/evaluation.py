"""sacreBLEU / chrF / TER with signatures, and translation of raw sentences."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import sacrebleu
import torch
from torch import nn

from transformer.config import DecodingConfig
from transformer.search import Hypothesis, decode_corpus
from transformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_TOKENIZED = re.compile(r"\w \.$|\w ,\s| n't\b| 's\b|&apos;|&quot;|@@ ")


@dataclass
class Translation:
    text: str
    score: float
    tokens: list[int]


def score_corpus(
    hypotheses: list[str], references: list[str], ter: bool = False
) -> dict[str, float | str]:
    """Corpus BLEU (13a, cased), chrF and optionally TER, with their signatures.

    Also reports lowercased BLEU for comparison with papers that use it.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references"
        )
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    result: dict[str, float | str] = {
        "bleu": bleu.corpus_score(hypotheses, [references]).score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf": chrf.corpus_score(hypotheses, [references]).score,
        "chrf_signature": str(chrf.get_signature()),
    }
    lower = sacrebleu.metrics.BLEU(lowercase=True)
    result["bleu_lc"] = lower.corpus_score(hypotheses, [references]).score
    result["bleu_lc_signature"] = str(lower.get_signature())
    if ter:
        metric = sacrebleu.metrics.TER()
        result["ter"] = metric.corpus_score(hypotheses, [references]).score
        result["ter_signature"] = str(metric.get_signature())
    return result


def reference_warnings(references: list[str]) -> list[str]:
    """Say when references look tokenized or hold <unk>: BLEU would mislead."""
    warnings = []
    if not references:
        return warnings
    tokenized = sum(bool(_TOKENIZED.search(r)) for r in references)
    if tokenized > 0.2 * len(references):
        warnings.append(
            f"{tokenized} of {len(references)} references look tokenized "
            "(' .', ' ,', \" n't\"); sacreBLEU expects detokenized text"
        )
    unk = sum("<unk>" in r for r in references)
    if unk:
        warnings.append(f"{unk} references contain '<unk>'")
    empty = [i for i, r in enumerate(references, start=1) if not r.strip()]
    if empty:
        warnings.append(
            f"{len(empty)} references are empty (first: line {empty[0]}): every "
            "word translated for them counts against BLEU"
        )
    return warnings


def translate(
    model: nn.Module,
    tokenizer: Tokenizer,
    sentences: list[str],
    cfg: DecodingConfig,
    device: torch.device,
    use_cache: bool = True,
    progress: bool = False,
    line_numbers: list[int] | None = None,
) -> list[list[Translation]]:
    """Raw source sentences -> n-best detokenized translations, in input order.

    ``line_numbers``: each sentence's line in the user's input, for warnings
    (default: its position in ``sentences``, from 1).
    """
    limit = model.cfg.max_pieces()
    ids = tokenizer.encode_src(sentences)
    too_long = [i for i, s in enumerate(ids) if len(s) > limit]
    if too_long:
        first = too_long[0]
        log.warning(
            "%d sentence(s) longer than the model's %d pieces were truncated "
            "(first: line %d)",
            len(too_long),
            limit,
            line_numbers[first] if line_numbers else first + 1,
        )
        ids = [s[:limit] for s in ids]
    results: list[list[Hypothesis]] = decode_corpus(
        model, ids, cfg, device, use_cache=use_cache, progress=progress
    )
    return [
        [Translation(tokenizer.decode_tgt(h.tokens), h.score, h.tokens) for h in hyps]
        for hyps in results
    ]

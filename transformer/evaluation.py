"""sacreBLEU / chrF / TER with signatures, and warnings about references."""

from __future__ import annotations

import logging
import re

import sacrebleu

log = logging.getLogger(__name__)

_TOKENIZED = re.compile(r"\w \.$|\w ,\s| n't\b| 's\b|&apos;|&quot;|@@ ")


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

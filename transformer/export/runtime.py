"""Translating with an exported model, with this toolkit's search settings.

- Our search never emits <pad> or <bos>; CTranslate2 is told so with
  ``suppress_sequences``. It masks them before the softmax, we after, so its
  log-probabilities are renormalised over the other tokens: greedy output is the
  same, scores are a little higher, and beams that nearly tie may swap (for a
  trained model, which gives <pad>/<bos> almost no probability, they practically
  never do). ``ExportedModel(..., suppress_specials=False)`` computes our exact
  log-probabilities instead, at the risk of a beam taking <pad>/<bos>.
- Length penalty: CTranslate2 divides a finished hypothesis' log-probability by
  ``|Y| ** length_penalty`` (|Y| counts </s>); ours is GNMT's ``((5 + |Y|) / 6) **
  alpha``, also counting <eos>. No setting makes them equal. ``ExportedModel`` runs
  CTranslate2's beam search with a non-zero penalty (which, like ours, keeps searching
  until ``beam_size`` hypotheses have finished; 0 stops as soon as the best beam
  ends), takes back the plain log-probabilities and re-ranks with GNMT's penalty.
- Controls: a target prefix is CTranslate2's ``target_prefix`` (whose
  log-probability it leaves out of the score: it is added back from
  ``score_batch``, so that scores count the prefix as ours do); forbidden phrases
  are its ``suppress_sequences`` (one list per call: sentences are grouped by
  theirs). Required phrases (``constraints``) and a prefix that ends its last
  word (a trailing space) have no CTranslate2 counterpart and are refused.
- Alignments come from ``return_attention``: the attention the export
  names in its ``alignment`` entry (this toolkit's exports: the last layer, every
  head averaged, as ``transformer-translate --alignment`` by default).
- ``score`` is ``score_batch``: the log-probabilities of given translations.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from transformer.alignment import pharaoh, source_words, target_words, word_links
from transformer.beam import length_penalty
from transformer.config import BOS_ID, EOS_ID, ConfigError, DataConfig, DecodingConfig
from transformer.controls import ControlError, Controls, PieceControls, encode_controls
from transformer.data.languages import Direction, direction, warn_zero_shot
from transformer.export.common import EXPORT_INFO, ExportError, import_ctranslate2
from transformer.inference import Translation
from transformer.scoring import PairScore
from transformer.search import Hypothesis, check_min_len, warn_min_len_cut
from transformer.tokenizer import Tokenizer, read_vocabulary

log = logging.getLogger(__name__)


# --- translating with an export ---


def _ct2_length_penalty(alpha: float, length: float) -> float:
    """CTranslate2's ``length_penalty`` that best stands in for GNMT's ``alpha``.

    CTranslate2 stops a sentence once ``beam_size`` hypotheses have finished, as ours
    does, unless its penalty is 0 (then it stops when the best beam ends), and keeps
    the ``beam_size`` best by score / |Y| ** beta. Our caller re-ranks those with
    GNMT's penalty, so beta only decides which finished hypotheses survive when more
    than ``beam_size`` finish at once. beta = alpha * n / (5 + n) is the slope of
    GNMT's log-penalty alpha * log((5 + |Y|) / 6) against log |Y| at |Y| = n (the
    expected length); a tiny beta keeps plain log-probabilities for alpha = 0.
    """
    return alpha * length / (5.0 + length) if alpha else 1e-20


class ExportedModel:
    """An exported model loaded in a ``ctranslate2.Translator``, with its tokenizer.

    Args:
        export_dir: a folder written by ``export_model``.
        device: ``cpu``, ``cuda`` or ``auto``.
        compute_type: CTranslate2's compute type (``default`` follows the weights).
        intra_threads: threads per translation (0: CTranslate2's default).
        suppress_specials: never emit <pad> or <bos>, as our search (see the module
            docstring for what this changes in the scores).
    """

    def __init__(
        self,
        export_dir: str | Path,
        device: str = "cpu",
        compute_type: str = "default",
        intra_threads: int = 0,
        suppress_specials: bool = True,
    ) -> None:
        ct2 = import_ctranslate2()
        self.dir = Path(export_dir)
        self.suppress_specials = suppress_specials
        try:
            self.info = json.loads((self.dir / EXPORT_INFO).read_text("utf-8"))
            files = self.info["tokenizer"]
            src = (self.dir / files["source_model"]).read_bytes()
            tgt = (self.dir / files["target_model"]).read_bytes()
            if files["joint"]:
                tgt = None
            vocabs = {  # the pieces' ids, where they are not the models' own
                key: read_vocabulary(self.dir / files[key], key)
                for key in ("vocab", "tgt_vocab")
                if files.get(key)
            }
            self.max_positions = int(self.info["max_positions"])
        except (OSError, ValueError, KeyError) as e:
            raise ExportError(
                f"{self.dir}: not an export of this toolkit ({type(e).__name__}: {e})"
            ) from e
        self.tokenizer = Tokenizer(src, tgt, **vocabs)
        # the languages (older exports did not record them: no tags)
        self.languages = DataConfig(**self.info.get("languages", {}))
        self.translator = ct2.Translator(
            str(self.dir),
            device=device,
            compute_type=compute_type,
            intra_threads=intra_threads,
        )

    def decoding_config(self, **options: Any) -> DecodingConfig:
        """The checkpoint's decoding defaults with ``options`` (DecodingConfig
        fields, None: keep) applied by ``DecodingConfig.with_options``' rules."""
        spelling = {"nbest": "nbest={}", "beam_size": "beam_size={}"}
        cfg = DecodingConfig(**self.info["decoding"]).with_options(options, spelling)
        check_min_len(cfg.min_len, self.max_positions, str(self.dir))
        return cfg

    def direction(self, src: str | None = None, tgt: str | None = None) -> Direction:
        """The direction ``src -> tgt`` (None: a bilingual model's own), as
        ``Translator.direction`` gives it for the checkpoint."""
        way = direction(self.languages, self.tokenizer, src, tgt, str(self.dir))
        warn_zero_shot(way, str(self.dir))
        return way

    def decode(
        self,
        sources: list[list[int]],
        cfg: DecodingConfig,
        way: Direction | None = None,
        controls: list[PieceControls | None] | None = None,
    ) -> list[list[Hypothesis]]:
        """Source ids (a source tag, pieces, no <eos>) -> ``cfg.nbest``
        hypotheses each, in order; ``way``: the direction (its tags);
        ``controls``: per sentence, a prefix and forbidden phrases.

        Mirrors ``transformer.search.decode_corpus``: greedy or beam search, the
        per-sentence length limit ``max_len_a * (|src| + 1) + max_len_b`` (tokens with
        <eos>), ``min_len``, and beam hypotheses ranked by the GNMT length penalty.
        """
        return [
            [h for h, _ in hyps] for hyps in self._search(sources, cfg, way, controls)
        ]

    def _search(
        self,
        sources: list[list[int]],
        cfg: DecodingConfig,
        way: Direction | None = None,
        controls: list[PieceControls | None] | None = None,
        attention: bool = False,
    ) -> list[list[tuple[Hypothesis, list[list[float]] | None]]]:
        """``decode``, each hypothesis with its attention (T, S) when asked."""
        if cfg.strategy == "sample":
            raise ConfigError("decoding.strategy: sampling is not supported here")
        if cfg.unk_penalty:  # CTranslate2 can only ban <unk> (disable_unk)
            raise ConfigError(
                "decoding.unk_penalty: not supported by the CTranslate2 runtime"
            )
        controls = controls or [None] * len(sources)
        _check_supported(controls)
        beam = cfg.strategy == "beam"
        k = cfg.beam_size if beam else 1
        way = way or Direction("", "")
        tgt_vocab = self.tokenizer.tgt
        tags = [[tgt_vocab.id_to_piece(i)] for i in way.banned]
        suppress = [[p] for p in self.info["suppress_tokens"]] + tags
        if not self.suppress_specials:
            suppress = []
        src_vocab = self.tokenizer.src
        pieces = [[src_vocab.id_to_piece(i) for i in s] for s in sources]
        # a tag as the decoder's first input: CTranslate2 starts from the prefix
        start = [tgt_vocab.id_to_piece(way.bos)] if way.bos != BOS_ID else []
        prefixes = [
            start + [tgt_vocab.id_to_piece(i) for i in (c.prefix if c else ())]
            for c in controls
        ]
        # CTranslate2 has one length limit and one list of banned sequences per
        # call: group sentences by ours
        limits = self.length_limits(sources, cfg)
        groups: dict[tuple, list[int]] = {}
        for i, limit in enumerate(limits):
            forbid = tuple(controls[i].forbid) if controls[i] else ()
            groups.setdefault((limit, forbid), []).append(i)
        results: list[list | None] = [None] * len(sources)
        if groups:
            warn_min_len_cut(cfg.min_len, min(limits))
        for (limit, forbid), indices in sorted(groups.items()):
            n0 = sum(len(sources[i]) + 1 for i in indices) / len(indices)
            beta = _ct2_length_penalty(cfg.length_penalty, n0) if beam else 0.0
            banned = suppress + [[tgt_vocab.id_to_piece(i) for i in f] for f in forbid]
            target_prefix = [prefixes[i] or None for i in indices]
            out = self.translator.translate_batch(
                [pieces[i] for i in indices],
                target_prefix=None if not any(target_prefix) else target_prefix,
                max_batch_size=max(cfg.max_tokens // k, 1),
                batch_type="tokens",
                beam_size=k,
                num_hypotheses=k,
                length_penalty=beta,
                # ours forces <eos> at token ``limit``: stop one token before it
                max_decoding_length=max(limit - 1, 1),
                min_decoding_length=min(cfg.min_len, max(limit - 1, 1)),
                max_input_length=self.max_positions,
                suppress_sequences=banned or None,
                return_end_token=True,
                return_scores=True,
                return_attention=attention,
            )
            # CTranslate2 leaves a prefix's own log-probability out of its score
            given = [i for i in indices if len(prefixes[i]) > len(start)]
            extra = dict.fromkeys(indices, 0.0)
            if given:
                scored = self.translator.score_batch(
                    [pieces[i] for i in given],
                    [prefixes[i] for i in given],
                    max_input_length=self.max_positions,
                )
                for i, result in zip(given, scored, strict=True):
                    extra[i] = sum(result.log_probs[:-1])  # not its </s>
            for i, result in zip(indices, out, strict=True):
                results[i] = self._hypotheses(result, beta, cfg, start, extra[i])
        return results

    def length_limits(self, sources: list[list[int]], cfg: DecodingConfig) -> list[int]:
        """Each sentence's length limit (tokens with <eos>), as ours: float32
        arithmetic as in ``transformer.search.max_lengths``."""
        src_len = torch.tensor([len(s) + 1 for s in sources], dtype=torch.float32)
        budget = (cfg.max_len_a * src_len + cfg.max_len_b).floor().long()
        return budget.clamp(1, self.max_positions).tolist()

    def _hypotheses(
        self,
        result,
        beta: float,
        cfg: DecodingConfig,
        start: list[str],
        prefix_score: float = 0.0,
    ) -> list[tuple[Hypothesis, list[list[float]] | None]]:
        hyps = []
        attention = result.attention or [None] * len(result.hypotheses)
        for tokens, score, att in zip(
            result.hypotheses, result.scores, attention, strict=True
        ):
            if start and tokens[:1] == start:
                tokens = tokens[1:]  # the tag the decoder started from
                att = att[1:] if att else att
            length = len(tokens)  # counts </s>, as both length penalties do
            ids = [self.tokenizer.tgt.piece_to_id(p) for p in tokens]
            if ids and ids[-1] == EOS_ID:
                ids = ids[:-1]
            if beta:  # undo CTranslate2's score / |Y| ** beta
                score = score * length**beta
            score += prefix_score
            if beta:  # apply GNMT's
                score /= length_penalty(length, cfg.length_penalty)
            hyps.append((Hypothesis(ids, score), att))
        hyps.sort(key=lambda h: h[0].score, reverse=True)
        return hyps[: cfg.nbest]

    def translate(
        self,
        sentences: list[str],
        cfg: DecodingConfig | None = None,
        src_lang: str | None = None,
        tgt_lang: str | None = None,
        controls: list[Controls | None] | None = None,
        alignment: bool = False,
    ) -> list[list[Translation]]:
        """Raw sentences -> n-best detokenized translations, like ``translate()``;
        a multilingual export needs the direction (``src_lang``, ``tgt_lang``).

        ``controls``: per sentence, a prefix and forbidden phrases (a sentence
        whose controls cannot be decoded raises ``ControlError`` naming it);
        ``alignment``: add Pharaoh word alignments from the export's attention.
        """
        cfg = cfg or self.decoding_config()
        way = self.direction(src_lang, tgt_lang)
        limit = self.max_positions - 1 - len(way.prefix)  # room for <eos>
        ids = self.tokenizer.encode_src(sentences)
        if any(len(s) > limit for s in ids):
            log.warning("sentences longer than %d pieces were truncated", limit)
        ids = [[*way.prefix, *s[:limit]] for s in ids]
        pieces = None
        if controls is not None:
            pieces = []
            limits = self.length_limits(ids, cfg)
            for number, (c, n) in enumerate(zip(controls, limits, strict=True), 1):
                if c is None or c.empty:
                    pieces.append(None)
                    continue
                try:
                    _check_supported([c], text=True)
                    pieces.append(encode_controls(c, self.tokenizer, n))
                except (ControlError, ConfigError) as e:
                    raise ControlError(f"sentence {number}: {e}") from None
        results = self._search(ids, cfg, way, pieces, attention=alignment)
        decode = self.tokenizer.decode_tgt
        out = []
        for src, hyps in zip(ids, results, strict=True):
            row = []
            for h, att in hyps:
                t = Translation(decode(h.tokens), h.score, h.tokens)
                if alignment:
                    t.alignment = self._alignment(src, h.tokens, att, way)
                row.append(t)
            out.append(row)
        return out

    def _alignment(self, src, tokens, attention, way: Direction) -> str:
        """Pharaoh links from CTranslate2's attention (T, S) of one hypothesis."""
        if not tokens or not attention:
            return ""
        tags = len(way.prefix)
        src_pieces = [self.tokenizer.src.id_to_piece(i) for i in src[tags:]]
        words = [-1] * tags + source_words(src_pieces) + [-1]  # </s>
        matrix = torch.tensor(attention, dtype=torch.float32)[: len(tokens)]
        matrix = matrix[:, : len(words)]
        tgt = target_words(tokens, self.tokenizer.decode_tgt)
        return pharaoh(word_links(matrix, words[: matrix.size(1)], tgt))

    def score(
        self,
        sources: list[str],
        targets: list[str],
        src_lang: str | None = None,
        tgt_lang: str | None = None,
        max_tokens: int = 8192,
    ) -> list[PairScore]:
        """Log-probabilities of ``targets`` as translations of ``sources``
        (CTranslate2's ``score_batch``), as ``Translator.score`` gives them."""
        way = self.direction(src_lang, tgt_lang)
        limit = self.max_positions - 1 - len(way.prefix)
        src_ids = self.tokenizer.encode_src(sources)
        tgt_ids = self.tokenizer.encode_tgt(targets)
        results = [
            PairScore(error=f"the source's {len(s)} pieces exceed the model's {limit}")
            for s in src_ids
        ]
        start = [self.tokenizer.tgt.id_to_piece(way.bos)] if way.bos != BOS_ID else []
        fits = [
            i
            for i, (s, t) in enumerate(zip(src_ids, tgt_ids, strict=True))
            if len(s) <= limit and len(t) + 1 <= self.max_positions
        ]
        for i, t in enumerate(tgt_ids):
            if len(t) + 1 > self.max_positions and len(src_ids[i]) <= limit:
                results[i] = PairScore(
                    error=f"the target's {len(t) + 1} tokens (with </s>) exceed the "
                    f"{self.max_positions} target positions the model has"
                )
        src_vocab, tgt_vocab = self.tokenizer.src, self.tokenizer.tgt
        scored = self.translator.score_batch(
            [
                [src_vocab.id_to_piece(j) for j in (*way.prefix, *src_ids[i])]
                for i in fits
            ],
            [start + [tgt_vocab.id_to_piece(j) for j in tgt_ids[i]] for i in fits],
            max_batch_size=max_tokens,
            batch_type="tokens",
            max_input_length=self.max_positions,
        )  # a tag in front is the decoder's start (no start token): not scored
        for i, result in zip(fits, scored, strict=True):
            probs = list(result.log_probs)
            results[i] = PairScore(sum(probs), len(probs), probs)
        return results


def _check_supported(controls, text: bool = False) -> None:
    """Refuse the controls CTranslate2 has no counterpart for, naming them."""
    for c in controls:
        if c is None:
            continue
        if c.constraints:
            raise ConfigError(
                "constraints: not supported by the CTranslate2 runtime (it has no "
                "lexically constrained search); use transformer-translate"
            )
        ends_word = c.prefix[-1:].isspace() if text else bool(c.after_prefix)
        if ends_word:
            raise ConfigError(
                "prefix: one that ends its last word (a trailing space) is not "
                "supported by the CTranslate2 runtime; drop the space"
            )


def translate_with_ctranslate2(
    export_dir: str | Path,
    sentences: list[str],
    beam_size: int | None = None,
    length_penalty: float | None = None,
    nbest: int = 1,
    device: str = "cpu",
    compute_type: str = "default",
    intra_threads: int = 0,
    src_lang: str | None = None,
    tgt_lang: str | None = None,
) -> list[list[Translation]]:
    """Translate ``sentences`` with an export; search defaults from the checkpoint.

    ``beam_size=1`` is greedy search; ``length_penalty`` is the GNMT alpha; a
    multilingual export needs the direction (``src_lang``, ``tgt_lang``).
    """
    model = ExportedModel(export_dir, device, compute_type, intra_threads)
    cfg = model.decoding_config(
        beam_size=beam_size, length_penalty=length_penalty, nbest=nbest
    )
    return model.translate(sentences, cfg, src_lang, tgt_lang)

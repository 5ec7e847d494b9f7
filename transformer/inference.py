"""Decoding's one entry point: load a model or an ensemble from checkpoints, pick
the device and precision, turn a user's options into a ``DecodingConfig`` and
translate.

Every front end (``transformer-eval``, ``transformer-translate``, the server, the
plots, the scripts) goes through here and only spells the options in its own
medium; none of them imports ``training``. A new search option is a field of
``DecodingConfig`` read by ``search.py``; each front end adds only its spelling.
What varies per sentence (a prefix, required and forbidden phrases:
``transformer.controls``) is not a search option: ``Translator`` checks it per
sentence (``encode_controls``) and hands it to the search with the sources.
Alignments (``transformer.alignment``) and scores of given translations
(``transformer.scoring``) go through here too. Loading (the device, checkpoints,
ensembles, precision) lives in ``transformer.loading``; its names are exported
here as well.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.alignment import (
    align,
    check_layer,
    pharaoh,
    source_words,
    target_words,
)
from transformer.allocator import reuse_freed_memory
from transformer.config import Config, ConfigError, DecodingConfig
from transformer.controls import ControlError, Controls, PieceControls, encode_controls
from transformer.data.languages import Direction, direction, warn_zero_shot
from transformer.loading import (
    check_decoding,
    load_ensemble,
    load_model,
    resolve_device,
    set_precision,
)
from transformer.scoring import PairScore, score_pairs
from transformer.search import Hypothesis, decode_corpus, length_limits
from transformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = [  # loading's names too: front ends import them from here
    "Outcome",
    "Translation",
    "Translator",
    "check_decoding",
    "load_ensemble",
    "load_model",
    "resolve_device",
    "set_precision",
    "translate",
    "unmet_warning",
]


# --- translating ---


@dataclass
class Translation:
    """One hypothesis: detokenized text, its score and its target pieces; the
    indices of the sentence's constraints it does not meet (only when none of
    its hypotheses could meet them within the length limit); its word alignment
    in Pharaoh format, when asked for."""

    text: str
    score: float
    tokens: list[int]
    unmet: tuple[int, ...] = ()
    alignment: str | None = None


@dataclass
class Outcome:
    """One sentence's result with controls: its n-best translations, or the
    reason it was refused (``error``); ``warnings`` name what it could not do
    (a source cut to the model's length, constraints not met)."""

    translations: list[Translation] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


def unmet_warning(controls: Controls | None, unmet: Sequence[int]) -> str | None:
    """The warning for a translation that misses constraints ``unmet``."""
    if not unmet or controls is None:
        return None
    names = ", ".join(repr(controls.constraints[i]) for i in unmet)
    return (
        f"constraints not met within the length limit: {names} (the best "
        "hypothesis without them is returned)"
    )


def translate(
    model: nn.Module,
    tokenizer: Tokenizer,
    sentences: list[str],
    cfg: DecodingConfig,
    device: torch.device,
    use_cache: bool = True,
    progress: bool = False,
    line_numbers: list[int] | None = None,
    way: Direction | None = None,
) -> list[list[Translation]]:
    """Raw source sentences -> n-best detokenized translations, in input order.

    ``line_numbers``: each sentence's line in the user's input, for warnings
    (default: its position in ``sentences``, from 1). ``way``: the direction of a
    multilingual model (``Translator.direction``).
    """
    way = way or Direction("", "")
    limit = model.cfg.max_pieces() - len(way.prefix)
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
    ids = [[*way.prefix, *s[:limit]] for s in ids]
    results: list[list[Hypothesis]] = decode_corpus(
        model,
        ids,
        cfg,
        device,
        use_cache=use_cache,
        progress=progress,
        bos=way.bos,
        banned=way.banned,
    )
    return [
        [Translation(tokenizer.decode_tgt(h.tokens), h.score, h.tokens) for h in hyps]
        for hyps in results
    ]


class Translator:
    """A model (or an ensemble) loaded once, with its tokenizer and device.

    Args:
        model: ``load_ensemble``'s model.
        config: the first checkpoint's config (decoding defaults, languages).
        checkpoints: the files it came from, for messages.
        infos: per checkpoint, its path, step and what went into an average.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Config,
        tokenizer: Tokenizer,
        device: torch.device,
        checkpoints: Sequence[str | Path],
        infos: list[dict[str, Any]] | None = None,
    ) -> None:
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.device, self.checkpoints = device, [str(c) for c in checkpoints]
        self.infos = infos or [{"checkpoint": c} for c in self.checkpoints]
        self.precision = "fp32"

    @classmethod
    def load(
        cls,
        checkpoints: Sequence[str | Path],
        device: str | torch.device = "auto",
        weights: str = "raw",
        device_option: str = "--device",
    ) -> Translator:
        """Load one checkpoint, or several as an ensemble, onto ``device``
        (``auto``, ``cpu``, ``cuda[:N]``); ``weights``: ``raw`` or ``ema``.

        On a CPU the process then keeps freed memory for reuse
        (``allocator.reuse_freed_memory``): each decoding step's large tensors
        take the blocks the previous step freed instead of new pages. The
        process (a server too) keeps its peak heap for its lifetime, as a
        caching allocator does, instead of returning it to the system."""
        if isinstance(device, str):
            device = resolve_device(device, device_option)
        if device.type == "cpu":
            reuse_freed_memory(single_arena=False)
        model, cfg, tokenizer, infos = load_ensemble(checkpoints, device, weights)
        return cls(model, cfg, tokenizer, device, checkpoints, infos)

    @property
    def directions(self) -> list[tuple[str, str]]:
        """The (source, target) languages it was trained on."""
        return self.config.data.directions()

    @property
    def multilingual(self) -> bool:
        return self.config.data.multilingual

    def direction(self, src: str | None = None, tgt: str | None = None) -> Direction:
        """The direction ``src -> tgt`` (None: a bilingual model's own), checked
        against what the model knows; a zero-shot one is named in a warning."""
        origin = ", ".join(self.checkpoints)
        way = direction(self.config.data, self.tokenizer, src, tgt, origin)
        warn_zero_shot(way, origin)
        return way

    def max_source(self, way: Direction | None = None) -> int:
        """Source pieces a sentence may have in direction ``way`` (one position is
        <eos>'s, and a source tag takes one)."""
        return self.model.cfg.max_pieces() - len(way.prefix if way else ())

    def decoding(
        self,
        options: Mapping[str, Any] | None = None,
        spelling: Mapping[str, str] | None = None,
        prefix: str = "decoding",
    ) -> DecodingConfig:
        """The checkpoint's search settings with ``options`` applied
        (``DecodingConfig.with_options``), checked against the loaded models."""
        dcfg = self.config.decoding.with_options(options or {}, spelling, prefix)
        check_decoding(dcfg, self.model, self.checkpoints)
        return dcfg

    def cast(self, precision: str) -> None:
        """Decode in ``precision`` (fp32 or bf16) from now on; once, before the
        first translation (a bf16 model is not cast back)."""
        if precision == self.precision:
            return
        if self.precision != "fp32":
            raise ConfigError(
                f"precision: the model already decodes in {self.precision}"
            )
        set_precision(self.model, precision)  # fp32 (a warning) without native bf16
        dtype = next(self.model.parameters(), torch.empty(0)).dtype
        self.precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        if precision == "int8":
            self.precision = "int8"

    def encode(
        self, sentences: list[str], way: Direction | None = None
    ) -> tuple[list[list[int]], list[int]]:
        """Source ids of each sentence as ``decode`` takes them (a source tag,
        then the pieces cut to ``max_source``); and the indices of the sentences
        that were cut."""
        way = way or Direction("", "")
        limit = self.max_source(way)
        ids = self.tokenizer.encode_src(sentences)
        cut = [i for i, s in enumerate(ids) if len(s) > limit]
        return [[*way.prefix, *s[:limit]] for s in ids], cut

    def decode(
        self,
        sources: list[list[int]],
        dcfg: DecodingConfig,
        way: Direction | None = None,
        use_cache: bool = True,
        progress: bool = False,
        controls: Sequence[PieceControls | None] | None = None,
    ) -> list[list[Translation]]:
        """Source ids from ``encode`` (no <eos>) -> n-best translations, in order;
        ``controls``: per sentence, from ``encode_controls``."""
        way = way or Direction("", "")
        results = decode_corpus(
            self.model,
            sources,
            dcfg,
            self.device,
            use_cache=use_cache,
            progress=progress,
            bos=way.bos,
            banned=way.banned,
            controls=controls,
        )
        decode = self.tokenizer.decode_tgt
        return [
            [Translation(decode(h.tokens), h.score, h.tokens, h.unmet) for h in hyps]
            for hyps in results
        ]

    def encode_controls(
        self,
        sources: list[list[int]],
        controls: Sequence[Controls | None],
        dcfg: DecodingConfig,
    ) -> tuple[list[PieceControls | None], list[str | None]]:
        """Each sentence's controls as pieces, checked against its length limit
        and the search; per sentence, the pieces or the reason they are refused
        (``ControlError``'s message)."""
        limits = length_limits(self.model, sources, dcfg)
        pieces: list[PieceControls | None] = []
        errors: list[str | None] = []
        for limit, c in zip(limits, controls, strict=True):
            if c is None or c.empty:
                pieces.append(None)
                errors.append(None)
                continue
            try:
                if c.constraints and dcfg.strategy != "beam":
                    raise ControlError(
                        f"constraints need beam search, not {dcfg.strategy}"
                    )
                pieces.append(encode_controls(c, self.tokenizer, limit))
                errors.append(None)
            except ControlError as e:
                pieces.append(None)
                errors.append(str(e))
        return pieces, errors

    def check_alignment(self, layer: int, option: str = "--alignment-layer") -> None:
        """Refuse alignments the model cannot give, naming ``option``."""
        why = check_layer(self.model, layer)
        if why is not None:
            name = option if why.startswith("must") else "alignment"
            raise ConfigError(f"{name}: {why}")

    def alignments(
        self,
        sources: list[list[int]],
        outputs: list[list[int]],
        way: Direction | None = None,
        layer: int = -1,
    ) -> list[str]:
        """Pharaoh word alignments of each source (ids from ``encode``) and its
        output (target ids) from attention layer ``layer``, averaged over heads
        (``transformer.alignment``)."""
        way = way or Direction("", "")
        tags = len(way.prefix)
        src_vocab = self.tokenizer.src
        out = []
        for src, tokens in zip(sources, outputs, strict=True):
            pieces = [src_vocab.id_to_piece(i) for i in src[tags:]]
            words = [-1] * tags + source_words(pieces)
            tgt_words = target_words(tokens, self.tokenizer.decode_tgt)
            links = align(
                self.model, src, tokens, words, tgt_words, way.bos, layer, self.device
            )
            out.append(pharaoh(links))
        return out

    def translate_controlled(
        self,
        sentences: list[str],
        dcfg: DecodingConfig,
        controls: Sequence[Controls | None] | None = None,
        alignment: int | None = None,
        way: Direction | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ) -> list[Outcome]:
        """Raw sentences with per-sentence ``controls`` -> per sentence, its
        n-best translations (with Pharaoh word alignments from attention layer
        ``alignment`` when not None) and warnings, or the reason its controls
        were refused."""
        way = way or Direction("", "")
        controls = list(controls) if controls is not None else [None] * len(sentences)
        sources, cut = self.encode(sentences, way)
        pieces, errors = self.encode_controls(sources, controls, dcfg)
        outcomes = [Outcome(error=e) for e in errors]
        limit = self.max_source(way)
        for i in cut:
            outcomes[i].warnings.append(
                f"longer than the model's {limit} pieces: only the first {limit} "
                "were translated"
            )
        todo = [i for i, e in enumerate(errors) if e is None]
        results = self.decode(
            [sources[i] for i in todo],
            dcfg,
            way,
            use_cache,
            progress,
            [pieces[i] for i in todo],
        )
        for i, hyps in zip(todo, results, strict=True):
            outcomes[i].translations = hyps
            warning = unmet_warning(controls[i], hyps[0].unmet if hyps else ())
            if warning:
                outcomes[i].warnings.append(warning)
        if alignment is not None:
            pairs = [(i, h) for i in todo for h in outcomes[i].translations]
            links = self.alignments(
                [sources[i] for i, _ in pairs],
                [h.tokens for _, h in pairs],
                way,
                alignment,
            )
            for (_, h), text in zip(pairs, links, strict=True):
                h.alignment = text
        return outcomes

    def score(
        self,
        sources: list[str],
        targets: list[str],
        way: Direction | None = None,
        max_tokens: int = 8192,
        per_token: bool = False,
        progress: bool = False,
    ) -> list[PairScore]:
        """Log-probabilities of ``targets`` as translations of ``sources``
        (``transformer.scoring``); a source longer than the model's pieces is not
        scored (``PairScore.error``), nor is a target longer than its positions."""
        way = way or Direction("", "")
        limit = self.max_source(way)
        src_ids = self.tokenizer.encode_src(sources)
        tgt_ids = self.tokenizer.encode_tgt(targets)
        fits = [i for i, s in enumerate(src_ids) if len(s) <= limit]
        results = [
            PairScore(error=f"the source's {len(s)} pieces exceed the model's {limit}")
            for s in src_ids
        ]
        scored = score_pairs(
            self.model,
            [[*way.prefix, *src_ids[i]] for i in fits],
            [tgt_ids[i] for i in fits],
            self.device,
            max_tokens,
            way.bos,
            per_token,
            progress,
        )
        for i, result in zip(fits, scored, strict=True):
            results[i] = result
        return results

    def translate(
        self,
        sentences: list[str],
        dcfg: DecodingConfig,
        use_cache: bool = True,
        progress: bool = False,
        line_numbers: list[int] | None = None,
        way: Direction | None = None,
    ) -> list[list[Translation]]:
        """Raw sentences -> n-best detokenized translations (``translate``), in
        direction ``way`` (default: a bilingual model's own)."""
        return translate(
            self.model,
            self.tokenizer,
            sentences,
            dcfg,
            self.device,
            use_cache,
            progress,
            line_numbers,
            way,
        )

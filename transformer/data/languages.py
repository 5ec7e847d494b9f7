"""Several translation directions in one model: the language tags, the direction a
sentence is translated in, and how directions share the training data.

One joint SentencePiece model serves every language; it reserves a tag per
language, ``<2xx>``, as a control piece, which no text encodes to and decoding
drops. A direction ``src -> tgt`` puts the tag of ``tgt`` in one of two places
(``data.tag``):

- ``source`` (Johnson et al. 2017): the first token of the source, before its
  pieces; the decoder starts from ``<bos>`` as in a bilingual model.
- ``target`` (fairseq's decoder-langtok, NLLB's forced first token): the decoder's
  first input instead of ``<bos>``; the source is the same for every direction.

Why ``target`` is the default: both were trained on Multi30k's six directions
(``configs/multi30k_multilingual.yaml``: en<->de, en<->fr, en<->cs, the same seed,
tokenizer, batches and schedule, one thread each, side by side) and validated
every 500 updates. The decoder-side tag led at both validations, in mean BLEU
(2.49 against 2.10 at 500 updates, 12.93 against 10.80 at 1,000) and in every one
of the six directions at 1,000 (by 1.4 to 2.8 BLEU), with a lower validation loss
(3.25 against 3.38). A plausible reading: the decoder is told the language at the
step it writes in it, instead of having to carry it through the encoder. The runs
are in ``results/multi30k_multilingual_tag.json``.

Every search bans the tags (none is ever emitted), as it bans ``<pad>`` and
``<bos>``. A direction the model was not trained on whose two languages it knows
is allowed (zero-shot) with a warning; a language it does not know is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from transformer.config import BOS_ID, ConfigError, DataConfig
from transformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Direction:
    """How a sentence is translated from ``src`` into ``tgt``.

    ``prefix``: ids before the source's pieces (the tag, or nothing; ``<BT>``
    before it for a tagged back-translated corpus); ``bos``: the decoder's first
    input (the tag, or ``<bos>``); ``banned``: ids the search never emits (every
    reserved piece); ``zero_shot``: a direction the model was not trained on.
    """

    src: str
    tgt: str
    prefix: tuple[int, ...] = ()
    bos: int = BOS_ID
    banned: tuple[int, ...] = ()
    zero_shot: bool = False

    @property
    def name(self) -> str:
        return f"{self.src}-{self.tgt}"


def direction(
    data: DataConfig,
    tokenizer: Tokenizer,
    src: str | None = None,
    tgt: str | None = None,
    origin: str = "the model",
) -> Direction:
    """The direction ``src -> tgt`` of a model trained with ``data`` (None: its
    only one). A bilingual model translates its own pair only; a multilingual
    one every pair of its languages (a pair it was not trained on is zero-shot).

    Raises:
        ConfigError: naming what ``origin`` knows.
    """
    trained = data.directions()
    if not data.multilingual:
        pair = trained[0]
        if (src or pair[0], tgt or pair[1]) != pair:
            raise ConfigError(
                f"{origin} translates {pair[0]}->{pair[1]} only (asked: "
                f"{src or pair[0]}->{tgt or pair[1]})"
            )
        return Direction(*pair, banned=tuple(sorted(tokenizer.reserved.values())))
    names = ", ".join(f"{s}->{t}" for s, t in trained)
    if src is None or tgt is None:
        raise ConfigError(
            f"{origin} is multilingual: say which direction (--src-lang and "
            f"--tgt-lang; it was trained on {names})"
        )
    known = data.languages()
    for lang in (src, tgt):
        if lang not in known:
            raise ConfigError(
                f"{origin} does not know the language {lang!r} (it knows "
                f"{', '.join(known)}; trained on {names})"
            )
    if src == tgt:
        raise ConfigError(f"{src}->{tgt}: source and target are the same language")
    tags = tokenizer.tags
    missing = [lang for lang in known if lang not in tags]
    if missing:
        raise ConfigError(
            f"{origin}: its tokenizer has no tag for {', '.join(missing)}: a "
            "multilingual model needs a tokenizer trained with data.pairs"
        )
    zero_shot = (src, tgt) not in trained
    tag = tags[tgt]
    banned = tuple(sorted(tokenizer.reserved.values()))  # tags and <BT>
    if data.tag == "source":
        return Direction(src, tgt, (tag,), BOS_ID, banned, zero_shot)
    return Direction(src, tgt, (), tag, banned, zero_shot)


def warn_zero_shot(way: Direction, origin: str = "the model") -> None:
    if way.zero_shot:
        log.warning(
            "%s->%s is zero-shot: %s was not trained on it (expect weaker output, "
            "sometimes in another language)",
            way.src,
            way.tgt,
            origin,
        )


def temperature_factors(sizes: list[float], temperature: float) -> list[float]:
    """Per direction, the factor on its weight that draws it in proportion to
    ``size ** (1 / temperature)`` while an epoch keeps its number of pairs:
    ``temperature`` 1 leaves every factor 1; a large one gives every direction
    the same share."""
    n = np.asarray(sizes, dtype=np.float64)
    if len(n) < 2 or temperature == 1.0 or not (n > 0).all():
        return [1.0] * len(n)
    share = n ** (1.0 / temperature)
    share /= share.sum()
    return (share * n.sum() / n).tolist()

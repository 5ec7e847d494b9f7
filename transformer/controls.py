"""Per-sentence controls of decoding: a target prefix, required phrases
(constraints) and forbidden phrases; their parsing, and their checks and
encoding into target pieces.

Controls vary from sentence to sentence, so they are not ``DecodingConfig``
fields: a front end reads them per sentence (a JSON line, a request's sentence
object, command-line flags that apply to every sentence) into ``Controls``;
``encode_controls`` turns each into ``PieceControls`` (ids) for the search, or
refuses it with a ``ControlError`` naming what is wrong.

How text becomes pieces:

- A prefix is encoded by the target SentencePiece model as it stands, and the
  output starts with exactly those pieces. A prefix that ends inside a word
  (``"Ein Hund ren"``) may have its last word continued by the search (``rennt``):
  its pieces are SentencePiece's for the text typed, and the next piece may
  continue the word. A prefix that ends with a space (``"Ein Hund "``) ends its
  last word: the first piece after it must start a new word (the pieces that
  continue a word are banned at that step).
- A required or forbidden phrase is encoded on its own, as words: its first
  piece starts a word (``"Hund"`` is ``▁Hund``). A phrase is met (or hit) when its
  pieces appear consecutively in the output, the prefix included.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformer.tokenizer import Tokenizer

# dynamic beam allocation gives each bank of hypotheses a share of the beam;
# beyond a few constraints a bank gets less than one hypothesis
MAX_CONSTRAINTS = 16
KEYS = ("prefix", "constraints", "forbid")


class ControlError(ValueError):
    """A sentence's controls that cannot be decoded; the message names the control."""


@dataclass(frozen=True)
class Controls:
    """One sentence's controls as text.

    Args:
        prefix: the output's first words ("" for none).
        constraints: phrases the output must contain, in any order.
        forbid: phrases the output must not contain.
    """

    prefix: str = ""
    constraints: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.prefix or self.constraints or self.forbid)

    @classmethod
    def from_dict(
        cls, obj: Mapping[str, Any], ignore: tuple[str, ...] = ()
    ) -> Controls:
        """``{"prefix": str, "constraints": [str], "forbid": [str]}``, every key
        optional (null counts as absent); keys in ``ignore`` are skipped, others
        are refused."""
        unknown = sorted(set(obj) - set(KEYS) - set(ignore))
        if unknown:
            raise ControlError(
                f"unknown key {unknown[0]!r} (expected {', '.join(KEYS)})"
            )
        prefix = obj.get("prefix")
        if prefix is None:
            prefix = ""
        if not isinstance(prefix, str):
            raise ControlError(f"prefix: expected a string, got {_kind(prefix)}")
        lists = {}
        for key in ("constraints", "forbid"):
            value = obj.get(key)
            if value is None:
                value = []
            if isinstance(value, str) or not isinstance(value, list):
                raise ControlError(
                    f"{key}: expected a list of strings, got {_kind(value)}"
                )
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise ControlError(
                        f"{key}[{i}]: expected a string, got {_kind(item)}"
                    )
            lists[key] = tuple(value)
        return cls(prefix, lists["constraints"], lists["forbid"])

    def merged(self, other: Controls) -> Controls:
        """These controls with ``other``'s added (``other``'s prefix wins)."""
        return Controls(
            other.prefix or self.prefix,
            self.constraints + other.constraints,
            self.forbid + other.forbid,
        )


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class PieceControls:
    """One sentence's controls as target ids, for the search.

    Args:
        prefix: ids the output starts with.
        constraints: phrases (ids) the output must contain.
        forbid: phrases (ids) the output must not contain.
        after_prefix: ids banned at the first step after the prefix (the
            pieces that would continue its last word, when it ends one).
    """

    prefix: tuple[int, ...] = ()
    constraints: tuple[tuple[int, ...], ...] = ()
    forbid: tuple[tuple[int, ...], ...] = ()
    after_prefix: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.prefix or self.constraints or self.forbid)


@functools.lru_cache(maxsize=8)
def _continuations(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Target ids of pieces that continue a word (no leading ``▁``), specials
    and control pieces aside."""
    sp = tokenizer.tgt
    return tuple(
        i
        for i in range(sp.vocab_size())
        if not (sp.is_control(i) or sp.is_unknown(i))
        and not sp.id_to_piece(i).startswith("\u2581")
    )


def _contains(seq: tuple[int, ...], part: tuple[int, ...]) -> bool:
    n = len(part)
    return any(seq[i : i + n] == part for i in range(len(seq) - n + 1))


def encode_controls(
    controls: Controls, tokenizer: Tokenizer, limit: int
) -> PieceControls:
    """Check one sentence's controls and encode them into target pieces.

    Args:
        limit: the sentence's length limit in tokens, </s> included
            (``decoding.max_len_a * source + max_len_b``, and the model's
            positions).

    Raises:
        ControlError: an empty phrase, a prefix or a phrase longer than the
            limit leaves room for, more than ``MAX_CONSTRAINTS`` constraints, a
            forbidden phrase that is required or part of the prefix.
    """
    room = limit - 1  # one position is </s>'s
    prefix: tuple[int, ...] = ()
    after: tuple[int, ...] = ()
    if controls.prefix.strip():
        prefix = tuple(tokenizer.encode_tgt([controls.prefix])[0])
        if len(prefix) > room:
            raise ControlError(
                f"prefix: {len(prefix)} pieces, more than the {room} the length "
                f"limit leaves ({limit} tokens with </s>)"
            )
        if controls.prefix[-1].isspace():
            after = _continuations(tokenizer)
    if len(controls.constraints) > MAX_CONSTRAINTS:
        raise ControlError(
            f"constraints: {len(controls.constraints)} given, at most "
            f"{MAX_CONSTRAINTS} a sentence"
        )
    required = _phrases("constraints", controls.constraints, tokenizer)
    for i, ids in enumerate(required):
        if len(ids) > room - len(prefix):
            raise ControlError(
                f"constraints[{i}] {controls.constraints[i]!r}: {len(ids)} pieces, "
                f"more than the {room - len(prefix)} the length limit leaves "
                f"({limit} tokens with </s>"
                + (f", {len(prefix)} of them the prefix's)" if prefix else ")")
            )
    banned = _phrases("forbid", controls.forbid, tokenizer)
    for i, ids in enumerate(banned):
        for j, need in enumerate(required):
            if _contains(need, ids):
                same = "is" if need == ids else "is part of"
                raise ControlError(
                    f"forbid[{i}] {controls.forbid[i]!r} {same} the required "
                    f"constraints[{j}] {controls.constraints[j]!r}"
                )
        if _contains(prefix, ids):
            raise ControlError(
                f"forbid[{i}] {controls.forbid[i]!r} is part of the prefix"
            )
    # a required phrase given twice is met by one occurrence (kept twice: the
    # search reports unmet constraints by their index)
    return PieceControls(
        prefix,
        tuple(required),
        tuple(dict.fromkeys(banned)),
        after if prefix else (),
    )


def _phrases(
    key: str, texts: tuple[str, ...], tokenizer: Tokenizer
) -> list[tuple[int, ...]]:
    for i, text in enumerate(texts):
        if not text.strip():
            raise ControlError(f"{key}[{i}]: empty phrase")
    if not texts:
        return []
    return [tuple(ids) for ids in tokenizer.encode_tgt(list(texts))]

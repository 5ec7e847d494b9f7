"""Every config key with its type, default and meaning, read from the dataclasses.

The descriptions are the source comments beside each field: the contiguous ``#``
lines directly above it and the comment at the end of its line. The walk follows
nested dataclasses (``data.tokenizer``) and lists of them (``data.train[]``)
without knowing any class by name, so a new section documents itself.
``scripts/docs.py`` renders the result as the site's config reference.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml


@dataclass(frozen=True)
class FieldDoc:
    """One settable key: ``key`` is dotted (``data.train[].weight``)."""

    key: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class SectionDoc:
    """A dataclass met on the walk and the keys directly inside it."""

    key: str  # "" for the root
    cls: type
    fields: list[FieldDoc]
    variant: str = ""  # "arch: rnn": the keys of one kind of the section only

    @property
    def summary(self) -> str:
        """The first line of the class docstring."""
        return (inspect.getdoc(self.cls) or "").split("\n\n")[0].replace("\n", " ")


def sections(cls: type, prefix: str = "") -> list[SectionDoc]:
    """The sections of dataclass ``cls``, depth first, each with its own fields.

    A field whose type is a dataclass (or ``X | None`` of one) is a section, not a
    key; a list of dataclasses is a key (the list itself) and a section whose keys
    are written ``key[].field``.
    """
    hints = typing.get_type_hints(cls)
    notes: dict[str, str] = {}  # a field inherited keeps its class's comment
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            notes.update(field_comments(base))
    own: list[FieldDoc] = []
    nested: list[SectionDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = _dataclass_in(tp)
        if inner is not None and typing.get_origin(tp) is not list:
            nested += sections(inner, f"{key}.")
            continue
        own.append(FieldDoc(key, type_name(tp), _default(f), notes.get(f.name, "")))
        if inner is not None:
            nested += sections(inner, f"{key}[].")
    return [SectionDoc(prefix.rstrip("."), cls, own), *_variants(cls, prefix), *nested]


def _variants(cls: type, prefix: str) -> list[SectionDoc]:
    """A section with a class per kind (``ModelConfig.kinds()``: one per
    ``model.arch``): each kind's own keys, beyond the fields they share."""
    if "kinds" not in vars(cls):  # the kinds themselves inherit it
        return []
    kinds = cls.kinds
    shared = {f.name for f in dataclasses.fields(cls)}
    out = []
    for (name, value), sub in kinds().items():
        (first, *_) = sections(sub, prefix)
        own = [f for f in first.fields if f.key.removeprefix(prefix) not in shared]
        out.append(SectionDoc(prefix.rstrip("."), sub, own, f"{name}: {value}"))
    return out


def field_docs(cls: type) -> list[FieldDoc]:
    """Every key of ``cls`` and its sections, in section order."""
    return [f for s in sections(cls) for f in s.fields]


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass that ``tp`` is, is optionally, or is a list of; else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    one = args[0] if len(args) == 1 else None
    if (origin is list or _is_union(origin)) and dataclasses.is_dataclass(one):
        return one
    return None


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def type_name(tp: Any) -> str:
    """A readable annotation: ``int``, ``str | None``, ``'relu' | 'gelu'``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if _is_union(origin):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _default(f: dataclasses.Field) -> str:
    """The default as YAML writes it (``null``, ``true``, ``[0.9, 0.98]``)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.strip().removesuffix("...").strip()


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comments (the lines above, then the end of its line),
    joined into one line. Fields without a comment are left out."""
    source = textwrap.dedent(inspect.getsource(cls))
    (node,) = ast.parse(source).body
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = tok.line[: tok.start[1]].strip() == ""
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    # lines inside a statement (a call over several lines) belong to it
    inside = {n for s in node.body for n in range(s.lineno, s.end_lineno + 1)}
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        line = stmt.lineno - 1
        while line in comments and comments[line][1] and line not in inside:
            above.insert(0, comments[line][0])
            line -= 1
        trailing = [
            comments[n][0]
            for n in range(stmt.lineno, stmt.end_lineno + 1)
            if n in comments and not comments[n][1]
        ]
        parts = [p for p in (*above, *trailing) if p and not _is_directive(p)]
        if parts:
            out[stmt.target.id] = " ".join(parts)
    return out


def _is_directive(comment: str) -> bool:
    """Tool comments (``# noqa``, ``# fmt: skip``, ``# type: ...``) say nothing."""
    return comment.startswith(("noqa", "fmt:", "type:", "pragma"))

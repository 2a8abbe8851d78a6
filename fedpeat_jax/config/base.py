"""The base every config dataclass shares: type checks from the annotations, `validate()`,
`replace()`, and the field descriptions read from the source (for `--help` and docs/config.md)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import numbers
import re
import tokenize
import types
import typing
from pathlib import Path

import numpy as np


def require(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless `ok`: the one way configs state their range checks."""
    if not ok:
        raise ValueError(message)


# --------------------------------------------------------------------------------------------
# Field types, checked from the annotations
# --------------------------------------------------------------------------------------------
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _what(value) -> str:
    """'4.0 (a float)', "'32' (a string)", 'True (a bool)' for error messages."""
    word = {
        bool: "a bool",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "a list",
        tuple: "a tuple",
        dict: "a JSON object",
        type(None): "null",
    }.get(type(value), type(value).__name__)
    return f"{value!r} ({word})"


def _describe(hint) -> str:
    """Words for an annotation: 'an integer', 'a tuple of integers', 'null or a number'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _KIND_WORDS:
        return _KIND_WORDS[hint]
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return "null or " + " or ".join(_describe(a) for a in rest)
    if hint is tuple or origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
        if args:
            return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
        return "a list"
    return f"a {getattr(hint, '__name__', hint)}"


class _Mismatch(Exception):
    pass


def _coerce(value, hint):
    """`value` as the annotation `hint` wants it (int -> float, list -> tuple, numpy scalars -> Python),
    or _Mismatch. Annotations this does not understand (Any, arrays, callables) pass unchecked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise _Mismatch
    if isinstance(value, (bool, np.bool_)) and hint in (int, float):
        raise _Mismatch  # True is an int to Python, never to a config
    if hint is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, numbers.Real):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if hint is tuple or origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise _Mismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_types(config) -> None:
    """Check (and normalize in place) every field of the frozen dataclass `config` against its
    annotation; the error names `Class.field`, the expected type and what was given."""
    cls = type(config)
    hints = _hints(cls)
    for f in dataclasses.fields(config):
        hint = hints.get(f.name)
        if hint is None:
            continue
        value = getattr(config, f.name)
        try:
            new = _coerce(value, hint)
        except _Mismatch:
            raise ValueError(f"{cls.__name__}.{f.name} must be {_describe(hint)}, got {_what(value)}") from None
        if new is not value:
            object.__setattr__(config, f.name, new)


class Config:
    """Base of every config dataclass: type checks from the annotations, then `validate()`.

    Subclasses are `@dataclass(frozen=True)` and put their range and consistency checks in
    `validate()` (which may take extra arguments with defaults, e.g. the model to check against).
    """

    def __post_init__(self):
        check_types(self)
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks; the types are already right when this runs."""

    def replace(self, **changes):
        """A copy with `changes` applied (checked like a new config)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Field descriptions, read from the source (for `fedpeat COMMAND --help` and docs/config.md)
# --------------------------------------------------------------------------------------------
def docstring_entries(doc: str) -> dict:
    """``name: text`` entries of a docstring (continuation lines indented deeper)."""
    entries, current = {}, None
    for line in inspect.cleandoc(doc or "").splitlines():
        m = re.match(r"^(\w+(?:\s*/\s*\w+)*)\s*:\s+(\S.*)$", line)
        if m and not line.startswith(" "):
            current = [n.strip() for n in m.group(1).split("/")]
            for n in current:
                entries[n] = m.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            for n in current:
                entries[n] += " " + line.strip()
        else:
            current = None
    return entries


@functools.cache
def field_sources(cls) -> dict:
    """{field: {"doc", "default_src", "annotation", "section"}} of a dataclass, from its source.

    A field's description ("doc") is the string literal right below it (an attribute docstring),
    else its ``# comment`` (on its line, or the comment block just above), else its ``name: text``
    entry in the class docstring. A one-line comment of fewer than 60 characters without a final
    full stop above a field is a section label ("section") for the fields below it.
    """
    path = inspect.getsourcefile(cls)
    source = Path(path).read_text()
    node = next(
        (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__), None
    )
    if node is None:
        return {}
    lines = source.splitlines()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), lines[tok.start[0] - 1].strip().startswith("#"))
    entries = docstring_entries(ast.get_docstring(node) or "")
    out, section = {}, None
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        inline = [
            comments[r][0] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments and not comments[r][1]
        ]
        above, row = [], stmt.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        if len(above) == 1 and len(above[0]) < 60 and not above[0].endswith("."):
            section, above = above[0], []
        after = body[i + 1] if i + 1 < len(body) else None
        docstring = None
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docstring = inspect.cleandoc(after.value.value).replace("\n", " ")
        doc = docstring or " ".join(above + inline).strip() or entries.get(name, "")
        out[name] = {
            "doc": doc,
            "section": section,
            "annotation": ast.get_source_segment(source, stmt.annotation),
            "default_src": ast.get_source_segment(source, stmt.value) if stmt.value is not None else None,
        }
    return out


def field_docs(cls) -> dict:
    """{field: description} of a config class (see `field_sources`)."""
    return {name: s["doc"] for name, s in field_sources(cls).items()}

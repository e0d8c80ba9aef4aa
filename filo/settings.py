"""Typed settings whose command-line flags are generated from the dataclass fields.

A settings class is a plain dataclass whose fields carry their flag in ``metadata``
(:func:`setting`): help text, extra flag names, choices and a range check. The name, the default
and the help of a flag are therefore written once, on the field, and every CLI that offers the
flag gets it from :func:`add_args` (anomalib-style: arguments generated from the typed config).
:func:`from_args` builds the dataclass back from the parsed namespace and validates every value,
so an out-of-range threshold is one clear line at parse time, before anything is loaded.

Supported field types: ``bool`` (``store_true``), ``int``, ``float``, ``str``, ``Path``, each
optionally ``| None``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from filo.errors import FiloError

Check = Callable[[Any], str | None]  # value -> problem (None when fine)


def setting(default: Any = None, help: str = "", *, aliases: Sequence[str] = (),
            choices: Sequence[Any] | None = None, check: Check | None = None,
            metavar: str | None = None, default_help: str | None = None,
            repeatable: bool = False) -> Any:
    """A dataclass field that is also a command-line flag ``--<field name>``.

    ``aliases``: further accepted flag names (an old name stays valid after a rename);
    ``check``: returns a problem description for a bad value; ``default_help``: how ``--help``
    shows a ``None`` default (e.g. "the checkpoint's size"); ``repeatable`` (a ``str`` field):
    the flag may be given several times, the values are kept comma-joined in order.
    """
    meta = {"help": help, "aliases": tuple(aliases), "choices": tuple(choices) if choices else None,
            "check": check, "metavar": metavar, "default_help": default_help,
            "repeatable": repeatable}
    return dataclasses.field(default=default, metadata={"flag": meta})


# ---- range checks ---------------------------------------------------------------------------

def in_range(lo: float, hi: float, *, lo_open: bool = False) -> Check:
    """Value in [lo, hi] (or (lo, hi] with ``lo_open``), never NaN."""
    left = "(" if lo_open else "["

    def check(v: Any) -> str | None:
        if v is None:
            return None
        bad = math.isnan(v) or v > hi or (v <= lo if lo_open else v < lo)
        return f"must be in {left}{lo}, {hi}]" if bad else None

    return check


def at_least(lo: int) -> Check:
    def check(v: Any) -> str | None:
        return None if v is None or v >= lo else f"must be at least {lo}"

    return check


# ---- argparse -------------------------------------------------------------------------------

class _JoinAppend(argparse.Action):
    """A repeatable string flag: every value (itself maybe comma-separated) is appended to the
    comma-joined value of the flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        old = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{old},{values}" if old else values)


def _base_type(tp: Any) -> tuple[type, bool]:
    """(base type, optional) of ``X`` or ``X | None``."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) != len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"unsupported setting type {tp}")
        tp = args[0]
    if tp not in (bool, int, float, str, Path):
        raise TypeError(f"unsupported setting type {tp}")
    return tp, optional


def flag_fields(cls: type, only: Iterable[str] | None = None) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are flags, in declaration order (``only``: a subset)."""
    fields = [f for f in dataclasses.fields(cls) if "flag" in f.metadata]
    if only is None:
        return fields
    wanted = list(only)
    names = {f.name for f in fields}
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f"{cls.__name__} has no flag(s) {', '.join(unknown)}")
    return [f for f in fields if f.name in wanted]


def add_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
             only: Iterable[str] | None = None) -> None:
    """Add one flag per field of ``cls`` (or of the ``only`` subset) to ``parser``."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls, only):
        meta = f.metadata["flag"]
        tp, _ = _base_type(hints[f.name])
        names = [f"--{f.name}", *meta["aliases"]]
        shown = meta["default_help"] or (f.default if f.default is not None else "none")
        help_text = meta["help"]
        if tp is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", default=f.default,
                                help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "type": tp,
                                  "help": f"{help_text} (default: {shown})"}
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta.get("repeatable"):
            kwargs["action"] = _JoinAppend
        parser.add_argument(*names, **kwargs)


def from_args(cls: type, ns: argparse.Namespace, **overrides: Any):
    """Build ``cls`` from the parsed flags present in ``ns`` (other fields keep their defaults),
    then :func:`validate` it."""
    values = {f.name: getattr(ns, f.name) for f in flag_fields(cls) if hasattr(ns, f.name)}
    values.update(overrides)
    obj = cls(**values)
    validate(obj)
    return obj


def validate(obj: Any) -> None:
    """Run every field's choices and range check; one :class:`FiloError` line for the first
    bad value, naming its flag."""
    for f in flag_fields(type(obj)):
        meta = f.metadata["flag"]
        value = getattr(obj, f.name)
        if value is None:
            continue
        if meta["choices"] and value not in meta["choices"]:
            raise FiloError(f"--{f.name} {value!r}: must be one of "
                            f"{', '.join(map(str, meta['choices']))}")
        if meta["check"] is not None:
            problem = meta["check"](value)
            if problem:
                raise FiloError(f"--{f.name} {value}: {problem}")


def as_dict(obj: Any) -> dict[str, Any]:
    """Field values with paths as strings (for logs and JSON)."""
    return {f.name: (str(v) if isinstance(v := getattr(obj, f.name), Path) else v)
            for f in dataclasses.fields(obj)}

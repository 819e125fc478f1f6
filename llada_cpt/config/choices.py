"""Choice fields: the allowed values come from the ``Literal`` annotation in :mod:`.schema`, nowhere else.

The loader checks each value as it builds the tree, and :func:`choice_problems`
re-checks a whole tree (a config changed in code after loading), both with
:func:`choice_problem`'s one line: the key, the bad value, the allowed values and
the closest match.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, List, Optional, Tuple

__all__ = ["choices_of", "field_choices", "choice_problem", "choice_problems"]


def choices_of(tp: Any) -> Optional[Tuple[Tuple[str, ...], bool]]:
    """``(allowed values, None allowed)`` of a ``Literal`` / ``Optional[Literal]`` annotation; None for others."""
    optional = False
    if typing.get_origin(tp) is typing.Union:
        args = typing.get_args(tp)
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            return None
        tp = inner[0]
    if typing.get_origin(tp) is not typing.Literal:
        return None
    return typing.get_args(tp), optional


def field_choices(cls: type, name: str) -> Tuple[str, ...]:
    """The allowed values of the choice field ``cls.name`` (for code that checks a value outside the loader)."""
    return choices_of(typing.get_type_hints(cls)[name])[0]


def choice_problem(where: str, value: Any, tp: Any) -> Optional[str]:
    """The one-line problem of ``value`` for the choice field ``where`` annotated ``tp``; None when it is allowed."""
    allowed, optional = choices_of(tp)
    if value in allowed and not isinstance(value, bool) or value is None and optional:
        return None
    names = ", ".join(allowed) + (" (or null)" if optional else "")
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6) if isinstance(value, str) else []
    hint = f" Did you mean `{close[0]}`?" if close else ""
    if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
        hint += " (YAML reads on/off/yes/no/true/false as a boolean: quote the value)"
    return f"{where} `{value}` is not one of {names}.{hint}"


def choice_problems(cfg: Any, path: str = "") -> List[str]:
    """Every choice field of the dataclass tree ``cfg`` whose value is not allowed, one line each."""
    out: List[str] = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        where = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            out += choice_problems(value, where)
        elif choices_of(hints[f.name]) is not None:
            problem = choice_problem(where, value, hints[f.name])
            if problem:
                out.append(problem)
    return out

"""JSONL reading for the post-training datasets, with bad-line bookkeeping.

Bad lines are collected, not raised one by one: a large file with a few broken
records should train (with a warning that names them) rather than stop, while a
file with nothing usable is an error.  Every problem is reported as
``file:line: reason`` so the user can jump to it.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Sequence, Tuple, Union

from ..errors import DataError

__all__ = ["RecordError", "LineReport", "iter_jsonl", "as_paths", "read_json_if_present"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def as_paths(paths: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    """One path or several; each must be an existing file."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise DataError("no data file given; pass at least one JSONL path")
    out = [os.fspath(p) for p in items]
    for p in out:
        if not os.path.isfile(p):
            raise DataError(f"data file {p} does not exist; check the path")
    return out


def read_json_if_present(path: str, fix: str) -> Any:
    """The parsed JSON file at ``path``, ``{}`` when there is none (optional side files).

    An unreadable or malformed file is a :class:`DataError` that says ``fix``.
    """
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path!r} ({err}); {fix}") from err


class RecordError(ValueError):
    """One record is unusable; ``kind`` is the short category used in the counts."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass
class LineReport:
    """Lines read and problems found, counted by kind, with the first few locations kept."""

    keep: int = 5
    lines: int = 0  # non-blank lines seen
    counts: Counter = field(default_factory=Counter)
    first: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, where: str, reason: str, kind: str) -> None:
        self.counts[kind] += 1
        if len(self.first) < self.keep:
            self.first.append(f"{where}: {reason}")

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        return f"{self.total} bad line(s) ({kinds}); first: " + "; ".join(self.first)

    def check(self, num_usable: int, what: str, fix: str) -> None:
        """Raise when nothing is usable, warn when some lines were skipped."""
        if num_usable == 0:
            detail = self.summary() if self.total else "the input is empty"
            raise DataError(f"no usable {what}: {detail}. Fix: {fix}")
        if self.total:
            log.warning("skipped %s", self.summary())


def iter_jsonl(paths: Sequence[str], bad: LineReport) -> Iterator[Tuple[str, dict]]:
    """``(file:line, object)`` for each JSON-object line; blank lines are skipped silently."""
    for path in paths:
        try:
            f = open(path, "r", encoding="utf-8", errors="strict")
        except OSError as err:
            raise DataError(f"cannot read data file {path} ({err.strerror}); check the data paths") from None
        with f:
            lineno = 0
            while True:
                try:
                    line = f.readline()
                except UnicodeDecodeError as e:
                    bad.add(f"{path}:{lineno + 1}", f"not UTF-8 ({e.reason}); the rest of the file is skipped",
                            "not UTF-8")
                    break
                if not line:
                    break
                lineno += 1
                where = f"{path}:{lineno}"
                if not line.strip():
                    continue
                bad.lines += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.add(where, f"invalid JSON ({e.msg} at column {e.colno})", "invalid JSON")
                    continue
                if not isinstance(obj, dict):
                    bad.add(where, "each line must be a JSON object", "not an object")
                    continue
                yield where, obj

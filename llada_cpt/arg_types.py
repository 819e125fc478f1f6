"""Command-line number types with their valid range, for ``argparse``'s ``type=``.

An option outside its range fails at parsing, before anything is started or
written: argparse prints ``llada-cpt <cmd>: error: argument --top-k: must be
>= 0, got -1`` and exits 2.  One place for the ranges keeps ``0`` from ever
meaning "not given" (defaults are ``None``, tested with ``is None``).
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

__all__ = ["int_range", "float_range"]


def int_range(lo: int, hi: Optional[int] = None, why: str = "") -> Callable[[str], int]:
    """An int in ``[lo, hi]`` (``hi`` None: no upper bound); ``why`` is appended to the message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got `{text}`") from None
        if value < lo or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}{why}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
                why: str = "") -> Callable[[str], float]:
    """A finite float in the interval from ``lo`` to ``hi`` (open ends where asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got `{text}`") from None
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        if not (math.isfinite(value) and above and below):
            left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{lo:g}, {hi:g}{right}, got {text}{why}")
        return value

    parse.__name__ = "float"
    return parse

#!/usr/bin/env python
"""Write the bundled RL demo set: seeded arithmetic questions with verifiable answers.

Each line is ``{"question": ..., "ground_truth_answer": ...}`` (the RL data format
of the seeds).  Questions hold one LaTeX expression between ``$...$`` (integers,
``\\times``, ``\\div``, ``\\frac{a}{b}``, parentheses) or a linear equation in x; the
answer is exact (``Fraction``), written as an integer or a reduced ``\\frac``.
The instruction to answer in ``\\boxed{}`` belongs to the RL prompt template, not
to the data (as in the reference GTPO rollout).  The output is a pure function
of ``--seed`` and ``--num`` and is written atomically (a temporary file renamed
into place), so a failed run leaves no partial file.

    python scripts/make_arithmetic_data.py            # regenerates llada_cpt/data/bundled/arithmetic_rl.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Callable

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llada_cpt" / "data" / "bundled" / "arithmetic_rl.jsonl"

Item = tuple[str, Fraction]  # (LaTeX, exact value)


def latex_number(v: Fraction) -> str:
    """``12``, ``-7``, ``\\frac{3}{4}``, ``-\\frac{1}{6}``."""
    if v.denominator == 1:
        return str(v.numerator)
    sign = "-" if v < 0 else ""
    return f"{sign}\\frac{{{abs(v.numerator)}}}{{{v.denominator}}}"


def _int(rng: random.Random, lo: int, hi: int) -> Item:
    n = rng.randint(lo, hi)
    return str(n), Fraction(n)


def _frac(rng: random.Random) -> Item:
    d = rng.randint(2, 12)
    n = rng.randint(1, d - 1)
    return f"\\frac{{{n}}}{{{d}}}", Fraction(n, d)


def _binary(rng: random.Random) -> Item:
    op = rng.choice("+-*")
    if op == "*":
        (a, va), (b, vb) = _int(rng, 2, 99), _int(rng, 2, 99)
        return f"{a} \\times {b}", va * vb
    (a, va), (b, vb) = _int(rng, 2, 999), _int(rng, 2, 999)
    return (f"{a} + {b}", va + vb) if op == "+" else (f"{a} - {b}", va - vb)


def _three_terms(rng: random.Random) -> Item:
    (a, va), (b, vb), (c, vc) = (_int(rng, 2, 30) for _ in range(3))
    form = rng.randrange(4)
    if form == 0:
        return f"({a} + {b}) \\times {c}", (va + vb) * vc
    if form == 1:
        return f"{a} \\times {b} - {c}", va * vb - vc
    if form == 2:
        return f"{a} - {b} \\times {c}", va - vb * vc
    (d, vd) = _int(rng, 2, 30)
    return f"({a} - {b}) \\times ({c} + {d})", (va - vb) * (vc + vd)


def _division(rng: random.Random) -> Item:
    b, q = rng.randint(2, 25), rng.randint(2, 40)
    return f"{b * q} \\div {b}", Fraction(q)


def _fractions(rng: random.Random) -> Item:
    (a, va), (b, vb) = _frac(rng), _frac(rng)
    op = rng.choice("+-*")
    if op == "*":
        return f"{a} \\times {b}", va * vb
    return (f"{a} + {b}", va + vb) if op == "+" else (f"{a} - {b}", va - vb)


EXPRESSIONS: list[Callable[[random.Random], Item]] = [_binary, _three_terms, _division, _fractions]
TEMPLATES = ["Compute ${}$.", "What is ${}$?", "Evaluate ${}$.", "Find the value of ${}$."]


def _equation(rng: random.Random) -> tuple[str, Fraction]:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
    c = a * x + b
    lhs = f"{a}x + {b}" if b >= 0 else f"{a}x - {-b}"
    return f"Solve for $x$: ${lhs} = {c}$.", Fraction(x)


def make_records(num: int, seed: int) -> list[dict]:
    """``num`` distinct records, deterministic in ``seed``."""
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < num:
        if rng.random() < 0.15:
            question, value = _equation(rng)
        else:
            expr, value = rng.choice(EXPRESSIONS)(rng)
            question = rng.choice(TEMPLATES).format(expr)
        if question in seen:
            continue
        seen.add(question)
        records.append({"question": question, "ground_truth_answer": latex_number(value)})
    return records


def write_jsonl(records: list[dict], out: Path) -> None:
    """Atomic write: the old file (if any) stays intact until the new one is complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output JSONL (default: {DEFAULT_OUT})")
    p.add_argument("--num", type=int, default=200, help="number of questions (default: 200)")
    p.add_argument("--seed", type=int, default=1234, help="random seed (default: 1234)")
    args = p.parse_args(argv)
    if not 1 <= args.num <= 20000:
        p.error(f"--num must be between 1 and 20000 (distinct questions), got {args.num}")
    write_jsonl(make_records(args.num, args.seed), args.out)
    print(f"wrote {args.num} questions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

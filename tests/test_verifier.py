"""Math verifier (boxed extraction + math-verify + fallback) and the bundled arithmetic RL data."""
import ast
import json
import operator
import os
import re
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from llada_cpt.rl.verifier import MathVerifier, VerifierConfig, extract_boxed_answer, normalize_answer

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "llada_cpt" / "data" / "bundled" / "arithmetic_rl.jsonl"
SCRIPT = ROOT / "scripts" / "make_arithmetic_data.py"


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(VerifierConfig(timeout_s=1))
    yield v
    v.close()


def in_thread(fn, *args):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args)))
    t.start()
    t.join(120)
    assert not t.is_alive(), "verification hung"
    return out["r"]


def test_extract_boxed_answer():
    assert extract_boxed_answer("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_boxed_answer("\\boxed{1} then \\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"
    assert extract_boxed_answer("\\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert extract_boxed_answer("\\boxed{ never closed, then \\boxed{7}") == "7"
    assert extract_boxed_answer("\\fbox{3}") == "3"
    assert extract_boxed_answer("no answer here") is None
    assert extract_boxed_answer("\\boxed{unclosed") is None
    assert extract_boxed_answer(None) is None


CASES = [
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{x=3}", "3", True),
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac34", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{-12}", "-12", True),
    ("\\boxed{12}", 12, True),  # a JSON number as ground truth
    ("\\boxed{5}", "\\boxed{5}", True),  # a ground truth stored with its box
    ("first \\boxed{4}, finally \\boxed{3}", "3", True),  # the last box counts
    ("\\boxed{4}", "3", False),
    ("\\boxed{-12}", "12", False),
    ("\\boxed{y=3}", "x=3", False),
    ("\\boxed{0.333}", "\\frac{1}{3}", False),
    ("first \\boxed{3}, finally \\boxed{4}", "3", False),
    ("the answer is 3", "3", False),  # no box: no credit
    ("\\boxed{}", "3", False),
    ("\\boxed{3", "3", False),
]


@pytest.mark.parametrize("text, gt, expected", CASES)
def test_verifier_cases(verifier, text, gt, expected):
    assert verifier(text, gt) is expected


def test_verifier_off_the_main_thread_agrees(verifier):
    # math-verify's own timeouts refuse to run off the main thread; the worker process must take over
    for text, gt, expected in CASES[:6] + CASES[11:15]:
        assert in_thread(verifier, text, gt) is expected


PATHOLOGICAL = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{(10^{100000000})!}",
    "\\boxed{" + "{" * 20000 + "1" + "}" * 20000 + "}",
    "\\boxed{" * 50000,
    "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
    "\\boxed{\\left(\\right.}",
]


@pytest.mark.parametrize("text", PATHOLOGICAL)
def test_pathological_answers_are_bounded_and_never_raise(verifier, text):
    t0 = time.monotonic()
    assert verifier(text, "3") is False
    assert time.monotonic() - t0 < verifier.cfg.hard_deadline_s + 2


def test_pathological_answer_off_the_main_thread(verifier):
    t0 = time.monotonic()
    assert in_thread(verifier, PATHOLOGICAL[0], "3") is False
    assert in_thread(verifier, "\\boxed{\\sqrt{8}}", "2\\sqrt{2}") is True  # the worker still answers
    assert time.monotonic() - t0 < 2 * verifier.cfg.hard_deadline_s + 30  # includes the worker's start


def test_a_pending_alarm_of_the_caller_is_left_alone(verifier):
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 600.0)
        assert verifier("\\boxed{2\\sqrt{2}}", "\\sqrt{8}") is True  # math-verify's alarm would cancel ours
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 500.0 < remaining <= 600.0 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_hung_worker_is_killed_and_replaced():
    v = MathVerifier(VerifierConfig(timeout_s=1))
    try:
        assert in_thread(v, "\\boxed{\\sqrt{8}}", "2\\sqrt{2}") is True  # starts the worker
        pid = v._worker._proc.pid
        os.kill(pid, signal.SIGSTOP)  # a worker stuck where no alarm can reach it
        t0 = time.monotonic()
        assert in_thread(v, "\\boxed{\\sqrt{8}}", "2\\sqrt{2}") is False  # unknown counts as wrong
        assert v.cfg.hard_deadline_s - 0.5 < time.monotonic() - t0 < v.cfg.hard_deadline_s + 5
        assert in_thread(v, "\\boxed{\\sqrt{8}}", "2\\sqrt{2}") is True
        assert v._worker._proc.pid != pid
    finally:
        v.close()


def test_normalize_answer_fallback():
    assert normalize_answer(" \\left( 1, 2 \\right) .") == "(1,2)"
    assert normalize_answer("\\text{(B)}") == "(B)"
    assert normalize_answer("x=12,345") == "12345"
    assert normalize_answer("90^\\circ") == "90"


# --------------------------------------------------------------------------- bundled data

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(node):
    """Exact evaluation of the arithmetic subset the questions use (independent of the generator)."""
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    raise AssertionError(f"unexpected syntax {ast.dump(node)}")


def solve_question(q: str) -> Fraction:
    m = re.fullmatch(r"Solve for \$x\$: \$(\d+)x ([+-]) (\d+) = (-?\d+)\$\.", q)
    if m:
        a, sign, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        return Fraction(c - (b if sign == "+" else -b), a)
    expr = re.search(r"\$(.+)\$", q)[1]
    expr = re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"(\1/\2)", expr).replace("\\times", "*").replace("\\div", "/")
    return _eval(ast.parse(expr, mode="eval"))


def parse_answer(a: str) -> Fraction:
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", a)
    if m:
        v = Fraction(int(m[2]), int(m[3]))
        assert v.denominator == int(m[3]), "fraction not in lowest terms"
        return -v if m[1] else v
    assert re.fullmatch(r"-?\d+", a), a
    return Fraction(int(a))


def test_bundled_arithmetic_answers_are_right(verifier):
    rows = [json.loads(line) for line in BUNDLED.read_text().splitlines()]
    assert len(rows) == 200 and len({r["question"] for r in rows}) == 200
    kinds = {"Solve": 0, "frac": 0, "times": 0, "div": 0}
    for r in rows:
        assert set(r) == {"question", "ground_truth_answer"}
        assert solve_question(r["question"]) == parse_answer(r["ground_truth_answer"]), r
        for k in kinds:
            kinds[k] += k in r["question"]
    assert all(n >= 10 for n in kinds.values()), kinds  # every kind of question is represented
    for r in rows[:20]:  # and the verifier agrees with the ground truth
        gt = r["ground_truth_answer"]
        value = parse_answer(gt)
        assert verifier(f"so \\boxed{{{gt}}}", gt)
        assert verifier(f"\\boxed{{{value.numerator}/{value.denominator}}}", gt)
        assert not verifier(f"\\boxed{{{value + 1}}}", gt)


def test_make_arithmetic_data_is_deterministic_and_in_sync(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out, seed in ((a, "1234"), (b, "1234")):
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--seed", seed], check=True,
                       capture_output=True)
    assert a.read_bytes() == b.read_bytes() == BUNDLED.read_bytes()
    c = tmp_path / "c.jsonl"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(c), "--seed", "7", "--num", "30"], check=True,
                   capture_output=True)
    assert len(c.read_text().splitlines()) == 30 and c.read_text() != a.read_text()[: len(c.read_text())]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "d.jsonl"), "--num", "0"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--num" in bad.stderr and not (tmp_path / "d.jsonl").exists()

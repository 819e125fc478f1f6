"""Math answer verifier: is the final ``\\boxed{...}`` of a completion equal to the ground truth?

Equality is decided by ``math-verify`` (``parse`` + ``verify``: ``\\frac{1}{2}`` ==
``0.5``, ``x=3`` == ``3``, ...), after a cheap string normalisation that also
serves as the fallback when math-verify cannot parse an answer.

Robustness is the point of this module: rewards are computed on whatever the
policy writes, so a pathological answer (``9^{9^{9^{9}}}``, megabytes of
braces) must neither hang training nor raise.  math-verify bounds each parse and
comparison with ``signal.alarm``, which only works on the main thread; off the
main thread (a reward thread pool, an async rollout worker) the work is sent to
one child worker process whose main thread has the alarms, and the caller
additionally enforces a hard wall-clock deadline, killing and restarting the
worker if it is exceeded.  Every failure ends in "not verified", never in an
exception.
"""
from __future__ import annotations

import json
import logging
import re
import select
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

try:  # this file also runs as a stand-alone worker script, where the package may not be importable
    from llada_cpt.errors import ConfigError
except ImportError:  # pragma: no cover - worker process only
    ConfigError = ValueError  # type: ignore[misc,assignment]

__all__ = [
    "VerifierConfig",
    "MathVerifier",
    "extract_boxed_answer",
    "boxed_spans",
    "normalize_answer",
    "verify_answer",
]

log = logging.getLogger(__name__)

_BRACE_TOKENS = re.compile(r"\\(?:boxed|fbox)\{|[{}]")


@dataclass
class VerifierConfig:
    """``timeout_s`` bounds each math-verify parse/comparison (whole seconds: ``signal.alarm``)."""

    timeout_s: int = 2
    max_answer_chars: int = 1000  # longer answers are compared by normalised string only
    float_rounding: int = 6

    def __post_init__(self) -> None:
        if int(self.timeout_s) != self.timeout_s or self.timeout_s < 1:
            raise ConfigError(
                f"rl.reward.verifier.timeout_s must be a whole number >= 1 (signal.alarm), got {self.timeout_s}"
            )
        if self.max_answer_chars < 1:
            raise ConfigError(f"rl.reward.verifier.max_answer_chars must be >= 1, got {self.max_answer_chars}")

    @property
    def hard_deadline_s(self) -> float:
        """Wall clock allowed for one isolated verification: 2 parses + 1 comparison, plus slack."""
        return 3 * self.timeout_s + 2.0


# --------------------------------------------------------------------------- extraction


def boxed_spans(text: str) -> list[tuple[int, int]]:
    """``(content_start, content_end)`` of every closed top-level ``\\boxed{...}``, left to right.

    One linear pass with a brace stack, so megabytes of unbalanced braces cost
    milliseconds; a box that never closes is ignored (a later closed box still counts).
    """
    stack: list[tuple[bool, int]] = []  # (opens a box?, content start)
    closed: list[tuple[int, int]] = []
    for m in _BRACE_TOKENS.finditer(text):
        if m.group() == "}":
            if stack:
                is_box, start = stack.pop()
                if is_box:
                    closed.append((start, m.start()))
        else:
            stack.append((m.group() != "{", m.end()))
    closed.sort()
    spans: list[tuple[int, int]] = []
    for a, b in closed:  # closed boxes nest properly: keep those not inside the previous top-level one
        if not spans or a > spans[-1][1]:
            spans.append((a, b))
    return spans


def extract_boxed_answer(text: str) -> Optional[str]:
    """Content of the last balanced ``\\boxed{...}`` (nested braces allowed); None if there is none."""
    if not isinstance(text, str):
        return None
    spans = boxed_spans(text)
    if not spans:
        return None
    a, b = spans[-1]
    return text[a:b]


# --------------------------------------------------------------------------- normalisation

_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_ASSIGN = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?=(?!=)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_FRAC = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_FRAC_SHORT = re.compile(r"^(-?)\\frac(\d)(\d)$")


def normalize_answer(s: str, strip_assignment: bool = True) -> str:
    """Canonical string form of a short answer; the fallback when math-verify cannot parse.

    Drops layout (spaces, ``\\left``/``\\right``, ``\\!``, ``$``), unwraps ``\\text{}``,
    unifies ``\\dfrac``/``\\tfrac``, removes a trailing period, thousands separators,
    degree marks and (optionally) a single-variable assignment prefix (``x=3`` -> ``3``).
    """
    s = str(s).strip()
    s = _TEXT_CMD.sub(r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                     ("$", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""),
                     ("\\%", "%")):
        s = s.replace(old, new)
    s = "".join(s.split())
    s = s.rstrip(".")
    if strip_assignment:
        s = _ASSIGN.sub("", s)
    s = _THOUSANDS.sub("", s)
    return s


def _as_fraction(s: str) -> Optional[Fraction]:
    """Exact value of a plain number, ``a/b`` or ``\\frac{a}{b}`` (already normalised), else None."""
    m = _FRAC.match(s) or _FRAC_SHORT.match(s)
    if m:
        sign, num, den = m.groups()
        s = f"{sign}{num}/{den}"
    if len(s) > 64 or not re.fullmatch(r"-?\d+(?:\.\d+)?(?:/-?\d+(?:\.\d+)?)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _fallback_equal(pred: str, gold: str) -> bool:
    # "x=3" matches "3", but "y=3" must not match "x=3": strip only a one-sided assignment
    a, b = normalize_answer(pred, False), normalize_answer(gold, False)
    if _ASSIGN.match(a) is None or _ASSIGN.match(b) is None:
        a, b = normalize_answer(a), normalize_answer(b)
    if a and a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    return fa is not None and fa == fb


# --------------------------------------------------------------------------- math-verify


def _math_verify_equal(pred: str, gold: str, timeout_s: Optional[int], float_rounding: int) -> Optional[bool]:
    """math-verify's verdict, or None when either side does not parse (caller falls back)."""
    from math_verify import parse, verify  # imported lazily: sympy is slow to import

    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=timeout_s)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=timeout_s)
    if not gold_parsed or not pred_parsed:
        return None
    return bool(verify(gold_parsed, pred_parsed, float_rounding=float_rounding, timeout_seconds=timeout_s))


def _worker_main() -> None:
    """Loop of the isolated worker (``python verifier.py``): one JSON request per line.

    Its main thread may use math-verify's signal-based timeouts.  math-verify is
    imported before "ready" so that no request's deadline pays for importing sympy.
    """
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            pred, gold, timeout_s, float_rounding = json.loads(line)
            verdict = _math_verify_equal(pred, gold, timeout_s, float_rounding)
        except BaseException:  # noqa: BLE001 - a verdict of "unknown" is the contract
            verdict = None
        out.write(json.dumps(verdict) + "\n")
        out.flush()


class _IsolatedWorker:
    """One child process running math-verify, killed and restarted after a hard timeout.

    Started with ``subprocess`` rather than ``multiprocessing`` so that the
    caller's ``__main__`` is never re-imported (an unguarded script would run twice).
    This module must therefore stay free of package-relative imports.
    """

    _STARTUP_S = 120.0

    def __init__(self, cfg: VerifierConfig):
        self._cfg = cfg
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None

    def _readline(self, timeout: float) -> Optional[str]:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        return self._proc.stdout.readline() if ready else None

    def _start(self) -> None:
        # run this file as a script: it needs only the standard library and math-verify,
        # so the worker starts without importing torch or the package
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, bufsize=1,
        )
        if self._readline(self._STARTUP_S) != "ready\n":
            raise RuntimeError("math-verify worker did not start")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
        self._proc = None

    def __call__(self, pred: str, gold: str) -> Optional[bool]:
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                self._proc.stdin.write(json.dumps([pred, gold, self._cfg.timeout_s, self._cfg.float_rounding]) + "\n")
                self._proc.stdin.flush()
                line = self._readline(self._cfg.hard_deadline_s)
                if line:
                    return json.loads(line)
                log.warning("math-verify worker exceeded %.0fs or died; restarting it", self._cfg.hard_deadline_s)
            except Exception:  # noqa: BLE001 - broken pipe, failed start: treat as unknown
                log.warning("math-verify worker failed; restarting it", exc_info=True)
            self._stop()
            return None

    def close(self) -> None:
        with self._lock:
            self._stop()


def _alarm_is_free() -> bool:
    """math-verify may use ``signal.alarm`` here: main thread, and no timer of the caller to clobber."""
    return threading.current_thread() is threading.main_thread() and signal.getitimer(signal.ITIMER_REAL)[0] == 0


class MathVerifier:
    """Callable ``(completion_or_answer, ground_truth) -> bool`` with bounded run time.

    Thread-safe.  On the main thread math-verify runs in-process with its own
    alarms; elsewhere (or while the caller has an alarm pending) it runs in a
    lazily started worker process (see module doc).
    """

    def __init__(self, cfg: VerifierConfig = VerifierConfig()):
        self.cfg = cfg
        self._worker = _IsolatedWorker(cfg)

    def answers_equal(self, pred: str, gold: str) -> bool:
        """Compare two extracted answers (no ``\\boxed`` search)."""
        try:
            pred, gold = str(pred), str(gold)
            if _fallback_equal(pred, gold):
                return True
            if not pred.strip() or not gold.strip():
                return False
            if max(len(pred), len(gold)) > self.cfg.max_answer_chars:
                return False  # only the normalised comparison above for huge answers
            if _alarm_is_free():
                verdict = _math_verify_equal(pred, gold, self.cfg.timeout_s, self.cfg.float_rounding)
            else:
                verdict = self._worker(pred, gold)
            return bool(verdict)
        except BaseException as e:  # noqa: BLE001 - includes math_verify's TimeoutException
            if isinstance(e, KeyboardInterrupt):
                raise
            log.debug("verification failed; counted as wrong", exc_info=True)
            return False

    def __call__(self, completion: str, ground_truth: Any) -> bool:
        """True iff the last ``\\boxed{}`` of ``completion`` equals ``ground_truth``; no box -> False."""
        answer = extract_boxed_answer(completion)
        if answer is None:
            return False
        gold = str(ground_truth)
        boxed_gold = extract_boxed_answer(gold)  # datasets sometimes store "\boxed{3}"
        return self.answers_equal(answer, boxed_gold if boxed_gold is not None else gold)

    def close(self) -> None:
        """Stop the worker process if one was started (it also exits when this process does)."""
        self._worker.close()


_default_verifier: Optional[MathVerifier] = None
_default_lock = threading.Lock()


def verify_answer(completion: str, ground_truth: Any) -> bool:
    """Module-level convenience over a shared default :class:`MathVerifier`."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            _default_verifier = MathVerifier()
    return _default_verifier(completion, ground_truth)


if __name__ == "__main__":
    # the script's directory holds modules (ppo, rewards, ...) that must not shadow anything
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    _worker_main()

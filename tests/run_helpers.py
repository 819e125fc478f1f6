"""Run the ``llada-cpt`` CLI as a real subprocess in tests, and read what a run leaves behind.

Processes start in their own session (``start_new_session``), so a test can
signal a run's whole process group the way a scheduler or a terminal does,
and kill it without touching pytest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"

# a short demo run: block size 1 then 4 (BDLM layout), few steps, no eval except at checkpoints
TINY_RUN = [
    "diffusion.block_schedule=[[1,3],[4,100]]",
    "diffusion.embedding_noise_steps=2",
    "train.lr_warmup_steps=2",
    "logging.log_interval=1",
    "logging.eval_iters=1",
]


def cli(*args: str) -> List[str]:
    """``llada-cpt <args>`` as an argv (the module form: no reliance on the console script being on PATH)."""
    return [sys.executable, "-m", "llada_cpt.cli", *args]


def file_size_limited(argv: Sequence[str], limit: int) -> List[str]:
    """``argv`` (a Python command) run under ``RLIMIT_FSIZE=limit`` bytes: a "full disk" for every file it writes.

    A write past the limit fails with EFBIG (Python ignores SIGXFSZ), the error a full disk gives
    as ENOSPC; no mount or privileges needed.
    """
    assert argv[0] == sys.executable
    wrapper = ("import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
               "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
    return [sys.executable, "-c", wrapper, str(limit), *argv[1:]]


def env(**extra: str) -> Dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def run(argv: Sequence[str], cwd: Path, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """Run to completion, capturing stdout / stderr as text."""
    return subprocess.run(list(argv), cwd=cwd, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


class Background:
    """A CLI run in its own session whose output goes to ``<log>.out`` / ``<log>.err``."""

    def __init__(self, argv: Sequence[str], cwd: Path, log: Path, **extra_env: str):
        self.out_path, self.err_path = log.with_suffix(".out"), log.with_suffix(".err")
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(list(argv), cwd=cwd, env=env(**extra_env), stdout=self._out, stderr=self._err,
                                     start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    def kill(self) -> None:
        """SIGKILL the launcher and every descendant; safe to call twice.

        torchrun starts each rank in a session of its own, so killing the
        launcher's process group would leave the ranks running: collect the
        whole process tree first (as a node failure would take it down).
        """
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        self.wait(30)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               proc: Optional[subprocess.Popen] = None, poll: float = 0.05) -> None:
    """Poll ``predicate``; fail with ``what`` on timeout or when ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def step_log(save_dir: Path) -> Dict[int, dict]:
    """``<save_dir>/train_log.jsonl`` by step; a step logged twice (re-run after a crash) keeps its last line."""
    out: Dict[int, dict] = {}
    path = Path(save_dir) / "train_log.jsonl"
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[int(rec["step"])] = rec
    return out


def latest_name(save_dir: Path) -> Optional[str]:
    p = Path(save_dir) / "latest"
    return p.read_text().strip() if p.is_file() else None


def assert_clean_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Exit code 2, exactly one ``llada-cpt <command>: error: ...`` line on stderr, no traceback; returns it."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit code {proc.returncode}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"llada-cpt {command}: error: ")]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err[-3000:]}"
    for needle in needles:
        assert needle in lines[0], f"`{needle}` not in the error line: {lines[0]}"
    return lines[0]


def process_tree(pid: int) -> list:
    """``psutil.Process`` objects of ``pid`` and all its descendants (what a scheduler would signal)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to every process of the tree, one by one, like slurmstepd does to a job step."""
    import psutil

    for proc in process_tree(pid):
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _stop_worker(step_seconds: float, steps: int) -> int:
    """A stand-in rank for launcher tests: StopRequest semantics without a model (starts in seconds)."""
    import torch.distributed as dist

    from llada_cpt.runtime.signals import EXIT_REQUEUE, StopRequest
    from llada_cpt.training.distributed import all_reduce_host

    stop = StopRequest.install(all_reduce_host)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(f"rank {rank} ready", flush=True)
    for step in range(1, steps + 1):
        time.sleep(step_seconds)  # "a training step"; signal handlers run, the sleep goes on (PEP 475)
        if stop.requested:
            print(f"rank {rank} stopping after step {step} ({stop.signame})", flush=True)
            dist.destroy_process_group()
            return EXIT_REQUEUE
    print(f"rank {rank} finished", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "stop-worker":
    sys.exit(_stop_worker(float(sys.argv[2]), int(sys.argv[3])))

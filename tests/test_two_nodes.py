"""Two nodes on one machine: ``launch/torchrun.sh`` started twice as node 0 and node 1 of a 2-node job
(2 processes each, c10d rendezvous on the loopback address), as on a cluster with a shared file system.

* killing one "node" (its launcher and ranks) with SIGKILL stops the other with one line, exit 1;
* starting both again resumes from ``latest`` with losses identical to an unbroken 4-rank run;
* the same checkpoint resumed on one node with 2 processes (data parallel 2 instead of 4) gives
  the next losses within 1e-4 relative.

Marked ``slow``: four runs of 4 gloo ranks take several minutes on 2 cores (``pytest -m slow``).
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import pytest

from run_helpers import REPO, TINY_CONFIG, TINY_RUN, Background, cli, latest_name, run, step_log, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STEPS = 8
COMMON = [f"train.train_steps={STEPS}", "checkpoint.save_interval=2", *TINY_RUN]


def losses(save_dir: Path) -> dict:
    return {s: r["loss"] for s, r in step_log(save_dir).items()}


def _node(save_dir: Path, port: int, log: Path) -> Background:
    argv = ["bash", str(REPO / "launch" / "torchrun.sh"), "train", "-c", str(TINY_CONFIG),
            f"checkpoint.save_dir={save_dir}", *COMMON]
    return Background(argv, cwd=save_dir.parent, log=log, NNODES="2", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), RDZV_ID=f"two-nodes-{port}", PYTHON=sys.executable)


def _both_nodes(save_dir: Path, tmp: Path, name: str) -> tuple:
    from dist import free_port

    port = free_port()
    first = _node(save_dir, port, tmp / f"{name}-node0")
    time.sleep(1.0)  # node 0 hosts the rendezvous store (either may: c10d falls back to a client)
    return first, _node(save_dir, port, tmp / f"{name}-node1")


def test_two_nodes_survive_a_lost_node_and_resume(tmp_path):
    # the reference: one unbroken run of 4 ranks on one node
    ref_dir = tmp_path / "unbroken"
    proc = run(cli("train", "-c", str(TINY_CONFIG), "--nproc", "4", f"checkpoint.save_dir={ref_dir}",
                   *COMMON, "checkpoint.save_interval=0"), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    unbroken = losses(ref_dir)
    assert sorted(unbroken) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in unbroken.values())

    # two nodes; node 1 is lost (SIGKILL to its launcher and ranks) after the first checkpoint
    save = tmp_path / "ck"
    node0, node1 = _both_nodes(save, tmp_path, "first")
    try:
        wait_until(lambda: latest_name(save) is not None, 900, "the first checkpoint", node0.proc)
        node1.kill()
        rc = node0.wait(300)
    finally:
        node0.kill()
        node1.kill()
    err = node0.stderr
    assert rc == 1, f"exit code {rc}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("llada-cpt train: error: ")]
    assert len(lines) == 1 and "lost contact with another process of the job" in lines[0], err[-3000:]
    assert "start every node again to resume" in lines[0]
    stopped_at = latest_name(save)
    from llada_cpt.checkpoint.verify import verify_run

    assert verify_run(save).ok, verify_run(save).lines()
    other_dp = tmp_path / "dp2" / "ck"
    shutil.copytree(save, other_dp)

    # both nodes again: resume from `latest`, exactly the unbroken run's losses
    node0, node1 = _both_nodes(save, tmp_path, "again")
    try:
        rc0, rc1 = node0.wait(900), node1.wait(300)
    finally:
        node0.kill()
        node1.kill()
    assert (rc0, rc1) == (0, 0), f"{rc0} {rc1}\n{node0.stderr[-2000:]}\n{node1.stderr[-2000:]}"
    resumed_at = int(stopped_at.split("_")[1])
    assert f"resumed from {save / stopped_at} at step {resumed_at}" in node0.stdout + node1.stdout
    assert losses(save) == unbroken

    # the same checkpoint on one node with 2 processes: data parallel 2 instead of 4
    proc = run(cli("train", "-c", str(TINY_CONFIG), "--nproc", "2", f"checkpoint.save_dir={other_dp}", *COMMON),
               cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {other_dp / stopped_at} at step {resumed_at}" in proc.stdout
    after = {s: v for s, v in losses(other_dp).items() if s > resumed_at}
    assert sorted(after) == list(range(resumed_at + 1, STEPS + 1))
    for s, v in after.items():
        assert abs(v - unbroken[s]) <= 1e-4 * abs(unbroken[s]), (s, v, unbroken[s])

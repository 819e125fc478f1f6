"""launch/slurm.sbatch on a real single-node Slurm (slurmctld + slurmd started by the test).

Recipe of DESIGN.md section 3: auth/none and cred/none (no munge), linuxproc
process tracking, cons_tres with CR_CPU, everything under a temporary
directory, short credential expiry and scheduler cycle so that a requeued job
starts again within seconds.  Slurm comes from Debian's ``slurm-wlm`` and is
installed with apt-get when missing.

Two jobs: a short training run (log + checkpoint), then a longer one that gets
``scancel --signal=USR1 --batch`` after its first checkpoint and must save,
requeue itself, resume from that checkpoint (same job id, same run directory)
and finish.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from run_helpers import REPO, TINY_RUN, latest_name, step_log, wait_until

pytestmark = pytest.mark.slurm

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _ensure_slurm() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "scontrol")):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is unavailable to install Debian's slurm-wlm")
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing slurm-wlm with apt-get needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    upd = subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True, timeout=600)
    if upd.returncode != 0:
        pytest.skip(f"apt-get cannot reach its repositories to install slurm-wlm: {upd.stderr.strip()[-300:]}")
    inst = subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert inst.returncode == 0, f"apt-get install slurm-wlm failed:\n{inst.stdout[-2000:]}\n{inst.stderr[-2000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """slurmctld + slurmd for this host, configured under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        for d in ("state", "spool", "log"):
            (root / d).mkdir(parents=True)
        self.conf = root / "slurm.conf"
        self.conf.write_text("\n".join([
            "ClusterName=lladatest",
            f"SlurmctldHost={self.host}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "AuthInfo=cred_expire=5",  # a requeued job waits this long before it may start again
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerParameters=bf_interval=1,sched_interval=1",
            "ReturnToService=2",
            "JobRequeue=1",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd.log",
            f"NodeName={self.host} CPUs=2 State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.daemons: list[subprocess.Popen] = []

    def start(self) -> None:
        for cmd, name in ((["slurmctld", "-D"], "slurmctld"), (["slurmd", "-D"], "slurmd")):
            with open(self.root / "log" / f"{name}.stdout", "w") as out:
                self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))
        try:
            wait_until(lambda: "idle" in self.cmd("sinfo", "-h", "-o", "%T", check=False), 60, "the node to be idle")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.logs()}") from None

    def stop(self) -> None:
        self.cmd("scancel", "--partition=test", check=False)
        try:
            wait_until(lambda: not self.cmd("squeue", "-h", check=False).strip(), 30, "cancelled jobs to leave")
        except AssertionError:
            pass
        for proc in reversed(self.daemons):
            proc.terminate()
        for proc in self.daemons:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").iterdir()):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(out)

    def cmd(self, *argv: str, check: bool = True) -> str:
        res = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60, cwd=REPO)
        if check:
            assert res.returncode == 0, f"{' '.join(argv)} failed: {res.stderr}"
        return res.stdout

    def sbatch(self, out: Path, run_root: Path, *train_args: str) -> int:
        """Submit ``launch/slurm.sbatch train -c configs/tiny_cpu.yaml ...`` for 2 ranks on the node."""
        res = self.cmd("sbatch", "--parsable", "--cpus-per-task=2", f"--output={out}", "--chdir", str(REPO),
                       f"--export=ALL,RUN_ROOT={run_root},NPROC_PER_NODE=2,PYTHON={sys.executable}",
                       "launch/slurm.sbatch", "train", "-c", "configs/tiny_cpu.yaml", *train_args)
        return int(res.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        line = self.cmd("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_job(self, job_id: int, timeout: float, log: Path) -> dict:
        info: dict = {}

        def done() -> bool:
            info.update(self.job(job_id))
            return info.get("JobState") in FINAL_STATES

        try:
            wait_until(done, timeout, f"job {job_id} to finish", poll=0.5)
        except AssertionError as err:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no job log)"
            raise AssertionError(f"{err} (state {info.get('JobState')})\n{tail}\n{self.logs()}") from None
        return info


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _ensure_slurm()
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def test_sbatch_trains_two_ranks_and_checkpoints(cluster, tmp_path):
    log, runs = tmp_path / "job.out", tmp_path / "runs"
    job = cluster.sbatch(log, runs, "train.train_steps=2", *TINY_RUN)
    info = cluster.wait_job(job, 240, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert "(1 nodes x 2 ranks)" in text and "llada-cpt cpt: 2 processes" in text
    losses = [float(m) for m in re.findall(r"^step \d+/2 \| .*?\| loss ([0-9.]+) \|", text, re.M)]
    assert len(losses) == 2, text[-3000:]
    run_dir = runs / f"llada-cpt-{job}"
    assert latest_name(run_dir) == "iter_0000002"
    assert (run_dir / "iter_0000002" / "metadata.json").is_file()
    assert [r["loss"] for _, r in sorted(step_log(run_dir).items())] == pytest.approx(losses, abs=1e-4)


def test_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path):
    log, runs = tmp_path / "job.out", tmp_path / "runs"
    steps = 16
    job = cluster.sbatch(log, runs, f"train.train_steps={steps}", "checkpoint.save_interval=3", *TINY_RUN)
    run_dir = runs / f"llada-cpt-{job}"
    wait_until(lambda: latest_name(run_dir) is not None, 240, "the first checkpoint", poll=0.2)
    cluster.cmd("scancel", "--signal=USR1", "--batch", str(job))
    info = cluster.wait_job(job, 300, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1", info
    stopped = re.search(r"stop requested by stop file: checkpoint saved at step (\d+), exiting", text)
    assert stopped, text[-4000:]
    stop_step = int(stopped.group(1))
    assert 3 <= stop_step < steps
    assert "requeueing job" in text and f"job {job} restart 1" in text
    resumed = re.search(r"resumed from (\S+) at step (\d+)", text)
    assert resumed, text[-4000:]
    assert Path(resumed.group(1)) == run_dir / f"iter_{stop_step:07d}" and int(resumed.group(2)) == stop_step
    assert latest_name(run_dir) == f"iter_{steps:07d}"
    assert sorted(step_log(run_dir)) == list(range(1, steps + 1))

"""Surviving faults: stop signals, a kill during a checkpoint save, NaN / Inf steps, checkpoint retention.

Runs use 2 gloo ranks on the embedded demo.  The reference is one unbroken run;
every interrupted-and-resumed run must log exactly its per-step losses
(``train_log.jsonl``, full precision).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from run_helpers import (
    REPO,
    TINY_CONFIG,
    TINY_RUN,
    Background,
    assert_clean_error,
    cli,
    file_size_limited,
    latest_name,
    run,
    signal_tree,
    step_log,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)

STEPS = 10
COMMON = [f"train.train_steps={STEPS}", "checkpoint.save_interval=2", *TINY_RUN]


def train_argv(save_dir: Path, *extra: str) -> list[str]:
    return cli("train", "-c", str(TINY_CONFIG), "--nproc", "2", f"checkpoint.save_dir={save_dir}", *COMMON, *extra)


def losses(save_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in step_log(save_dir).items()}


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("unbroken")
    proc = run(train_argv(tmp / "ck", "checkpoint.save_interval=0"), cwd=tmp)  # no saves / evals in between
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = losses(tmp / "ck")
    assert sorted(ref) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in ref.values())
    return ref


# --------------------------------------------------------------------------- SIGTERM, like a scheduler
def test_sigterm_saves_exits_3_and_resumes_with_unbroken_losses(tmp_path, unbroken):
    save = tmp_path / "ck"
    bg = Background(train_argv(save), cwd=tmp_path, log=tmp_path / "stopped")
    try:
        wait_until(lambda: latest_name(save) is not None, 240, "the first checkpoint", bg.proc)
        # every process of the job, one by one (slurmstepd's way): launcher, ranks, the ranks' helpers
        signal_tree(bg.proc.pid, signal.SIGTERM)
        rc = bg.wait(120)
    finally:
        bg.kill()
    out, err = bg.stdout, bg.stderr
    assert rc == 3, f"exit code {rc}\n{out[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    m = re.search(r"stop requested by SIGTERM: checkpoint saved at step (\d+), exiting", out)
    assert m, out[-2000:]
    stop_step = int(m.group(1))
    assert 2 < stop_step < STEPS
    assert latest_name(save) == f"iter_{stop_step:07d}"
    assert (save / f"iter_{stop_step:07d}" / "metadata.json").is_file()
    assert not list(save.glob("*.tmp"))

    proc = run(train_argv(save), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {save / f'iter_{stop_step:07d}'} at step {stop_step}" in proc.stdout
    assert f"{STEPS - stop_step} steps to go" in proc.stdout
    assert losses(save) == unbroken  # exact: same data, noise, RNG and optimizer state after resume


# --------------------------------------------------------------------------- the launcher's signal relay
def _launch_stop_workers(tmp_path: Path, step_seconds: float) -> Background:
    argv = [sys.executable, "-m", "llada_cpt.runtime.launch", "--standalone", "--nproc-per-node=2",
            str(REPO / "tests" / "run_helpers.py"), "stop-worker", str(step_seconds), "2000"]
    bg = Background(argv, cwd=tmp_path, log=tmp_path / "workers")
    wait_until(lambda: bg.stdout.count(" ready") == 2, 120, "both ranks to start", bg.proc)
    return bg


@pytest.mark.parametrize("target, sig", [("launcher", signal.SIGTERM), ("every process", signal.SIGTERM),
                                         ("every process", signal.SIGINT)])  # SIGINT to all: Ctrl-C in a terminal
def test_one_stop_signal_is_one_stop_request(tmp_path, target, sig):
    """Plain torchrun re-sends SIGTERM to ranks that already had it (= 'second signal, exit at once')."""
    bg = _launch_stop_workers(tmp_path, step_seconds=0.2)
    try:
        if target == "launcher":
            os.kill(bg.proc.pid, sig)
        else:
            signal_tree(bg.proc.pid, sig)
        rc = bg.wait(60)
    finally:
        bg.kill()
    assert rc == 3, f"exit code {rc}\n{bg.stdout}\n{bg.stderr[-3000:]}"
    stops = re.findall(r"rank (\d) stopping after step \d+ \(([^)]+)\)", bg.stdout)  # (lines may interleave)
    assert sorted(r for r, _ in stops) == ["0", "1"], bg.stdout
    if target == "launcher":  # the ranks learn it from the stop file the launcher touched
        assert {why for _, why in stops} <= {"stop file", "peer"} and "stop file" in {w for _, w in stops}
    else:
        assert {why for _, why in stops} == {signal.Signals(sig).name}
    assert "Traceback" not in bg.stderr, bg.stderr[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_stops_at_once(tmp_path, sig):
    bg = _launch_stop_workers(tmp_path, step_seconds=120)  # a long step: the first signal cannot finish it
    try:
        signal_tree(bg.proc.pid, sig)
        time.sleep(1.0)
        t0 = time.monotonic()
        signal_tree(bg.proc.pid, sig)
        rc = bg.wait(30)
        elapsed = time.monotonic() - t0
    finally:
        bg.kill()
    assert rc == 128 + sig, f"exit code {rc}\n{bg.stderr[-3000:]}"
    assert elapsed < 15
    assert "stopping after step" not in bg.stdout
    assert f"stopped at once by a second {signal.Signals(sig).name}" in bg.stderr


# --------------------------------------------------------------------------- SIGKILL in the middle of a save
def _train_until_save_of(rank: int, world: int, save_dir: str, hang_at: int, marker_dir: str):
    """A rank that trains normally but freezes once the data of checkpoint ``hang_at`` is written,
    before its RNG files, metadata, rename and ``latest`` update: a kill then hits a half-saved checkpoint."""
    from megatron.core import dist_checkpointing

    from llada_cpt.config import load_config
    from llada_cpt.stages.cpt import CPTStage
    from llada_cpt.training.loop import train

    original = dist_checkpointing.save

    def save(sharded, path, *args, **kwargs):
        out = original(sharded, path, *args, **kwargs)
        if Path(path).name == f"iter_{hang_at:07d}.tmp":
            Path(marker_dir, f"rank{rank}").touch()
            time.sleep(3600)
        return out

    dist_checkpointing.save = save
    cfg = load_config(TINY_CONFIG, [f"checkpoint.save_dir={save_dir}", *COMMON])
    cfg.stage = "cpt"
    train(cfg, CPTStage(cfg))


def test_kill_during_save_keeps_previous_latest_and_resume_matches(tmp_path, unbroken):
    import torch.multiprocessing as mp

    from dist import _entry, free_port

    save, markers = tmp_path / "ck", tmp_path / "markers"
    markers.mkdir()
    ctx = mp.start_processes(_entry, args=(_train_until_save_of, 2, free_port(), str(tmp_path),
                                           (str(save), 4, str(markers))),
                             nprocs=2, join=False, start_method="spawn")
    try:
        wait_until(lambda: len(list(markers.iterdir())) == 2, 300, "both ranks to be inside the save of step 4")
        assert (save / "iter_0000004.tmp").is_dir() and latest_name(save) == "iter_0000002"
    finally:
        for p in ctx.processes:
            signal_tree(p.pid, signal.SIGKILL)
        for p in ctx.processes:
            p.join(30)
    assert [p.exitcode for p in ctx.processes] == [-signal.SIGKILL] * 2
    assert latest_name(save) == "iter_0000002" and not (save / "iter_0000004").exists()

    proc = run(train_argv(save), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {save / 'iter_0000002'} at step 2" in proc.stdout
    assert latest_name(save) == f"iter_{STEPS:07d}" and not list(save.glob("*.tmp"))
    assert losses(save) == unbroken  # steps 3-4 were logged twice; the resumed run's values count


# --------------------------------------------------------------------------- a full disk during a save
def test_full_disk_during_a_save_keeps_latest_and_resume_matches(tmp_path, unbroken):
    """The save of step 2 hits the file-size limit (EFBIG; a full disk gives ENOSPC, handled alike): one line
    saying so and where, the partial directory removed, `latest` still on step 1; with space back, the
    same command resumes from step 1 and logs exactly the unbroken run's losses."""
    save = tmp_path / "ck"
    stop_file = tmp_path / "stop"
    stop_file.touch()  # a stop request from the start: checkpoint after step 1, exit 3
    proc = run(train_argv(save), cwd=tmp_path, LLADA_CPT_STOP_FILE=str(stop_file))
    assert proc.returncode == 3 and latest_name(save) == "iter_0000001", proc.stderr[-3000:]

    proc = run(file_size_limited(train_argv(save), 4 << 20), cwd=tmp_path)  # a shard of the demo is ~14 MB
    assert_clean_error(proc, "train", f"disk full while saving checkpoint iter_0000002 in {save}",
                       "removed the partial iter_0000002.tmp", "`latest` still names iter_0000001", "free space")
    assert latest_name(save) == "iter_0000001"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001"]

    proc = run(train_argv(save), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {save / 'iter_0000001'} at step 1" in proc.stdout
    assert losses(save) == unbroken


# --------------------------------------------------------------------------- NaN / Inf
def _nan_run(rank: int, world: int, save_dir: str, policy: str, steps: int, bad_grad_step: int,
             bad_loss_step: int):
    """Train with NaN gradients injected on the last rank only at one step (its loss stays finite) and an
    infinite loss at another; report per step whether it changed the weights, and its data indices."""
    import dataclasses

    import torch

    from llada_cpt.config import load_config
    from llada_cpt.stages.cpt import CPTStage
    from llada_cpt.training import step as step_mod
    from llada_cpt.training.loop import train
    from llada_cpt.training.nan_guard import TrainingDiverged

    changed, finite, indices, calls, prev = {}, {}, {}, [], {}
    original_fb = step_mod.forward_backward

    def snapshot(chunks, step):  # the weights before `step`, i.e. after step - 1
        now = torch.cat([p.detach().flatten().float().clone() for c in chunks for p in c.parameters()])
        finite[step - 1] = bool(torch.isfinite(now).all())
        if "w" in prev:
            changed[step - 1] = not torch.equal(prev["w"], now)
        prev["w"] = now

    def forward_backward(chunks, batches, forward_only=False, **kw):  # kw: the stage's loss_fn
        if forward_only:
            return original_fb(chunks, batches, forward_only=True, **kw)
        calls.append(None)
        step = len(calls)
        snapshot(chunks, step)
        params = [p for c in chunks for p in c.parameters()]
        hooks = []
        if step == bad_grad_step and rank == world - 1:
            hooks = [params[-1].register_hook(lambda g: g * float("nan"))]
        res = original_fb(chunks, batches, forward_only=False, **kw)
        for h in hooks:
            h.remove()
        if step == bad_loss_step:
            res = dataclasses.replace(res, loss=float("inf"))
        return res

    step_mod.forward_backward = forward_backward
    original_data = CPTStage.step_data

    def step_data(self, run, block_size):
        data = original_data(self, run, block_size)
        indices[run.iteration + 1] = list(data.data_indices)
        return data

    CPTStage.step_data = step_data
    cfg = load_config(TINY_CONFIG, [f"checkpoint.save_dir={save_dir}", f"train.train_steps={steps}",
                                    "checkpoint.save_interval=2", f"train.nan_policy={policy}", *TINY_RUN,
                                    "train.lr_warmup_steps=0"])  # (warmup starts at lr 0: step 1 would not move)
    cfg.stage = "cpt"
    try:
        result, error = train(cfg, CPTStage(cfg)), None
    except TrainingDiverged as err:
        result, error = None, str(err)
    return {"changed": changed, "finite": finite, "indices": indices, "error": error, "steps_run": len(calls),
            "history": None if result is None else result["history"]}


def test_nan_gradient_on_one_rank_skips_the_step_for_all(tmp_path, capfd):
    from dist import run_distributed

    steps, bad_grad, bad_loss = 7, 3, 5
    res = run_distributed(_nan_run, 2, str(tmp_path / "ck"), "skip", steps, bad_grad, bad_loss, timeout=400)
    out = capfd.readouterr().out
    for r in res:
        assert r["error"] is None and len(r["history"]) == steps
        # changed[s]: did step s move the weights (known for the steps followed by another)
        assert [s for s, moved in sorted(r["changed"].items()) if not moved] == [bad_grad, bad_loss], r["changed"]
        assert all(r["finite"].values()), r["finite"]
    for bad, what in ((bad_grad, "gradients"), (bad_loss, "loss inf")):
        expected = sorted(set(res[0]["indices"][bad]) | set(res[1]["indices"][bad]))
        assert len(expected) == 16  # the global batch
        line = f"step {bad}: non-finite {what}; global batch data indices {expected}"
        assert line in out, out[-3000:]
        assert out.count(f"step {bad}: non-finite") == 1  # printed once, not per rank
    log = step_log(tmp_path / "ck")
    assert [s for s, r in sorted(log.items()) if r["skipped"]] == [bad_grad, bad_loss]
    assert latest_name(tmp_path / "ck") == f"iter_{steps:07d}"


def test_nan_stop_policy_raises_and_keeps_latest(tmp_path):
    from dist import run_distributed

    (res,) = run_distributed(_nan_run, 1, str(tmp_path / "ck"), "stop", 6, 3, 99, timeout=400)
    assert res["error"] is not None and res["history"] is None and res["steps_run"] == 3
    assert res["error"].startswith("step 3: non-finite gradients; global batch data indices [")
    assert "train.nan_policy=stop" in res["error"] and "`latest` still names iter_0000002" in res["error"]
    assert latest_name(tmp_path / "ck") == "iter_0000002"
    assert sorted(p.name for p in (tmp_path / "ck").glob("iter_*")) == ["iter_0000002"]
    assert all(res["finite"].values())


# --------------------------------------------------------------------------- retention
def _fake_run(root: Path, ppl: dict[int, object], latest: int) -> Path:
    for it, value in ppl.items():
        d = root / f"iter_{it:07d}"
        d.mkdir(parents=True)
        (d / "metadata.json").write_text("{}")
        metrics = {"iteration": it} if value is None else {"iteration": it, "val_ppl": value}
        (d / "metrics.json").write_text(json.dumps(metrics))
    (root / "latest").write_text(f"iter_{latest:07d}\n")
    return root


def _merge_picks(root: Path, k: int) -> set[str]:
    from llada_cpt.checkpoint.paths import CheckpointError
    from llada_cpt.checkpoint.selection import select_top_k

    try:
        return {c.path.name for c in select_top_k(root, k).chosen}
    except CheckpointError:
        return set()


def _check_retention(root: Path, keep_last: int, keep_best: int) -> None:
    from llada_cpt.checkpoint.megatron import apply_retention
    from llada_cpt.checkpoint.paths import list_checkpoints

    before = [p.name for p in list_checkpoints(root)]
    latest = latest_name(root)
    picks = {k: _merge_picks(root, k) for k in range(1, keep_best + 1)}
    apply_retention(root, keep_last, keep_best)
    after = {p.name for p in list_checkpoints(root)}
    assert latest in after, "deleted the checkpoint `latest` names"
    for k, chosen in picks.items():
        assert chosen <= after, f"deleted {sorted(chosen - after)}, which merge --top-k {k} picks"
        assert _merge_picks(root, k) == chosen, f"merge --top-k {k} changed its answer"
    assert set(before[-keep_last:]) <= after
    protected = set(before[-keep_last:]) | {latest} | set().union(*picks.values())
    assert after == protected, f"kept {sorted(after - protected)} for no reason"


def test_retention_tie_keeps_the_checkpoint_merge_picks(tmp_path):
    # iterations 2 and 4 tie on val_ppl; merge prefers the newer (4)
    root = _fake_run(tmp_path, {1: 5.0, 2: 3.0, 3: 4.0, 4: 3.0, 5: 8.0, 6: 7.0, 7: 9.0}, latest=7)
    _check_retention(root, keep_last=2, keep_best=1)
    assert latest_name(root) == "iter_0000007" and (root / "iter_0000004").is_dir()


def test_retention_ignores_unscored_and_nan_checkpoints(tmp_path):
    root = _fake_run(tmp_path, {1: 4.0, 2: float("nan"), 3: None, 4: 6.0, 5: "n/a", 6: 7.0, 7: 8.0}, latest=7)
    _check_retention(root, keep_last=1, keep_best=2)
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000001", "iter_0000004", "iter_0000007"]


def test_retention_never_deletes_an_older_latest(tmp_path):
    # resumed from an older checkpoint: `latest` is not the newest directory
    root = _fake_run(tmp_path, {2: 9.0, 4: 8.0, 6: 7.0, 8: 6.0}, latest=4)
    _check_retention(root, keep_last=1, keep_best=1)
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000004", "iter_0000008"]


def test_retention_random_runs(tmp_path):
    rng = random.Random(0)
    for trial in range(60):
        n = rng.randint(1, 9)
        values = [rng.choice([1.0, 2.0, 3.0, rng.uniform(1, 9), float("nan"), None]) for _ in range(n)]
        iters = sorted(rng.sample(range(1, 100), n))
        root = _fake_run(tmp_path / str(trial), dict(zip(iters, values)), latest=rng.choice(iters))
        _check_retention(root, keep_last=rng.randint(1, 3), keep_best=rng.randint(0, 3))


def test_retention_keep_last_zero_keeps_everything(tmp_path):
    from llada_cpt.checkpoint.megatron import apply_retention

    root = _fake_run(tmp_path, {1: 3.0, 2: 2.0, 3: 1.0}, latest=3)
    assert apply_retention(root, 0, 0) == [] and len(list(root.glob("iter_*"))) == 3

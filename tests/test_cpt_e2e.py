"""CPT end to end on the embedded demo: 2 gloo processes through the real CLI."""
import math
import re
import shutil

import pytest

from run_helpers import TINY_CONFIG, Background, cli, run, step_log, wait_until

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """Build the demo corpus and tokenizer once for this module (a private cache dir)."""
    from llada_cpt.data.demo_corpus import ensure_demo_data

    cache = tmp_path_factory.mktemp("demo_cache")
    ensure_demo_data(str(cache))
    return cache


def train_argv(save_dir, cache, *overrides):
    return cli("train", "-c", str(TINY_CONFIG), "--nproc", "2", f"checkpoint.save_dir={save_dir}",
               f"data.cache_dir={cache}", "logging.log_interval=1", "logging.eval_iters=2", *overrides)


def test_demo_trains_loss_falls_and_writes_tensorboard(tmp_path, demo_cache):
    save = tmp_path / "run"
    proc = run(train_argv(save, demo_cache, "train.train_steps=40", "logging.eval_interval=20",
                          "checkpoint.save_interval=20", "diffusion.block_schedule=[[1,10],[4,10],[128,20]]",
                          "train.lr_warmup_steps=5", "train.lr=3e-3"), cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    vals = {int(s): float(v) for s, v in re.findall(r"step (\d+): validation val_loss ([0-9.]+)", out)}
    assert set(vals) == {0, 20, 40}
    assert vals[40] < vals[0] - 0.5, vals  # the demo learns, visibly
    # the WSD schedule switches the batch layout mid-run, and the log says so
    assert "step 0: block size 1 -> layout BDLM [x_t ; x_0] (2L)" in out
    assert "step 10: block size 4 -> layout BDLM [x_t ; x_0] (2L)" in out
    assert "step 20: block size 128 -> layout MDLM (x_t only, L)" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("step ") and "| loss " in ln]
    assert len(lines) == 40 and all(f"| {k} " in lines[0] for k in ("lr", "block", "mask", "grad", "tok/s", "mem"))
    assert "MFU" in lines[0]
    # checkpoints: latest points at the last one, which carries validation metrics for a top-k merge
    assert (save / "latest").read_text().strip() == "iter_0000040"
    import json

    metrics = json.loads((save / "iter_0000040" / "metrics.json").read_text())
    assert math.isclose(metrics["val_loss"], vals[40], rel_tol=1e-3) and metrics["val_ppl"] > 1
    assert (save / "iter_0000040" / "config.yaml").is_file()
    # TensorBoard events read back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(save / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/block_size", "train/mask_ratio", "train/grad_norm",
                "train/tokens_per_s", "train/memory_gb", "valid/val_loss", "valid/val_ppl"):
        assert tag in tags, (tag, sorted(tags))
    block = [e.value for e in acc.Scalars("train/block_size")]
    assert block[0] == 1 and block[-1] == 128 and 4 in block
    assert len(acc.Scalars("train/loss")) == 40


def test_sigkill_after_checkpoint_resumes_bit_exactly(tmp_path, demo_cache):
    common = ["train.train_steps=10", "checkpoint.save_interval=4", "diffusion.block_schedule=[[1,5],[4,100]]",
              "diffusion.embedding_noise_steps=6"]
    ref = tmp_path / "unbroken"
    proc = run(train_argv(ref, demo_cache, *common), cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    unbroken = {s: r["loss"] for s, r in step_log(ref).items()}
    assert sorted(unbroken) == list(range(1, 11))

    save = tmp_path / "killed"
    bg = Background(train_argv(save, demo_cache, *common), cwd=tmp_path, log=tmp_path / "killed")
    try:
        wait_until(lambda: (save / "latest").is_file() and (save / "latest").read_text().strip() == "iter_0000008",
                   300, "the step-8 checkpoint", bg.proc)
    finally:
        bg.kill()  # SIGKILL the launcher and both ranks: no chance to clean up
    proc = run(train_argv(save, demo_cache, *common), cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 8" in proc.stdout
    resumed = {s: r["loss"] for s, r in step_log(save).items()}
    for step in range(1, 11):
        assert resumed[step] == unbroken[step], (step, resumed[step], unbroken[step])


@pytest.mark.parametrize("layout", [["parallel.pipeline_model_parallel_size=2"], []], ids=["pp2", "dp2"])
def test_checkpoint_from_tp2_resumes_under_another_layout(tmp_path, demo_cache, layout):
    common = ["train.train_steps=6", "checkpoint.save_interval=3", "diffusion.block_schedule=[[4,100]]"]
    tp = tmp_path / "tp2"
    proc = run(train_argv(tp, demo_cache, *common, "parallel.tensor_model_parallel_size=2"), cwd=tmp_path,
               timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp_losses = {s: r["loss"] for s, r in step_log(tp).items()}
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(tp / "iter_0000003", other / "iter_0000003")
    (other / "latest").write_text("iter_0000003\n")
    proc = run(train_argv(other, demo_cache, *common, *layout), cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 3" in proc.stdout
    losses = {s: r["loss"] for s, r in step_log(other).items()}
    assert sorted(losses) == [4, 5, 6]
    for step in (4, 5, 6):  # same math, different reduction order: equal to float32 round-off
        assert math.isclose(losses[step], tp_losses[step], rel_tol=1e-4), (step, losses[step], tp_losses[step])

"""The ``dpo`` stage: DPO on the ELBO through the real stage step, its layouts, and a CLI run."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from dist import run_distributed
from stage_runs import DPO_STEPS, SFT_MIN_LR, dpo_run, mean, small_config, step_records, validation_losses

pytestmark = pytest.mark.timeout(900)

LOG2 = math.log(2.0)
SGD_LR = 0.05


def _step(stage, run, forward_only):
    from llada_cpt.training.loop import run_step

    data = stage.step_data(run, stage.block)
    res = run_step(run, stage, data.micro_batches, forward_only)
    return data, {"loss": res.loss, "pairs": res.num_eligible, **res.metrics}


def _layouts(rank: int, world: int, out: str) -> dict:
    """TP=1 x DP=2 from scratch (reference = the initial weights), then TP=2, CP=2, PP=2 from checkpoints."""
    from llada_cpt.checkpoint import megatron as ckpt
    from llada_cpt.stages.dpo import DPOStage
    from llada_cpt.training.loop import build_run, run_step

    results = {}
    cfg = small_config("dpo")
    stage = DPOStage(cfg)
    run = build_run(cfg, stage)
    ckpt.save_checkpoint(f"{out}/w0", 0, run.model_chunks, None, None, {}, cfg)
    data, results["initial"] = _step(stage, run, forward_only=False)
    # one plain SGD step along the (DP-reduced, pair-normalised) DPO gradient
    with torch.no_grad():
        for chunk in run.model_chunks:
            for p in chunk.parameters():
                p.add_(p.main_grad, alpha=-SGD_LR)
    after = run_step(run, stage, data.micro_batches, forward_only=True)
    results["after_sgd"] = {"loss": after.loss, **after.metrics}
    ckpt.save_checkpoint(f"{out}/w1", 1, run.model_chunks, None, None, {}, cfg)

    def policy_w1(*overrides: str) -> dict:
        """Reference w0 (init_from), policy w1, the same step's data, forward only."""
        c = small_config("dpo", f"train.init_from={out}/w0", *overrides)
        s = DPOStage(c)
        r = build_run(c, s)
        ckpt.load_checkpoint(f"{out}/w1/iter_0000001", r.model_chunks, restore_rng=False)
        return _step(s, r, forward_only=True)[1]

    results["tp1_dp2"] = policy_w1()
    results["tp2"] = policy_w1("parallel.tensor_model_parallel_size=2")
    results["cp2"] = policy_w1("parallel.context_parallel_size=2")
    results["pp2"] = policy_w1("parallel.pipeline_model_parallel_size=2")  # reference pass pipelined too
    # a precomputed reference: one pass of the starting weights (the policy is w0 here)
    from llada_cpt.stages.dpo import REFERENCE_ELBO
    from llada_cpt.training.reference import build_reference
    from llada_cpt.training.step import forward_backward

    c = small_config("dpo", f"train.init_from={out}/w0", "dpo.reference=precomputed")
    s = DPOStage(c)
    r = build_run(c, s)
    results["precomputed_initial"] = _step(s, r, forward_only=True)[1]
    results["precomputed_cache"] = s.ref_cache.clone()
    s.position = 0
    batches = s.step_data(r, s.block).micro_batches
    s._attach_reference(r, batches)
    live = forward_backward(build_reference(c, r, s.init.path), batches, forward_only=True, loss_fn=REFERENCE_ELBO)
    results["cached_vs_live"] = [(b.ref_elbo, o["elbo"]) for b, o in zip(batches, live.outputs)]
    return results


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return run_distributed(_layouts, 2, str(tmp_path_factory.mktemp("dpo_layouts")), timeout=600)


def test_policy_equal_to_reference_gives_log2_through_the_stage_step(layouts):
    for per_rank in layouts:  # the same global values on every rank
        first = per_rank["initial"]
        assert first["pairs"] >= 4
        assert abs(first["loss"] - LOG2) < 1e-6
        assert first["reward_margin"] == 0.0 and first["accuracy"] == 0.0
        assert first["chosen_elbo"] == first["ref_chosen_elbo"] < 0
        assert first["rejected_elbo"] == first["ref_rejected_elbo"] < 0
    assert layouts[0]["initial"] == layouts[1]["initial"]


def test_one_sgd_step_raises_the_chosen_minus_rejected_margin(layouts):
    before, after = layouts[0]["initial"], layouts[0]["after_sgd"]
    assert after["reward_margin"] > 0 and after["loss"] < LOG2 - 1e-4
    # the gradient moved the chosen ELBO up relative to the rejected one
    rise_chosen = after["chosen_elbo"] - before["chosen_elbo"]
    rise_rejected = after["rejected_elbo"] - before["rejected_elbo"]
    assert rise_chosen > rise_rejected
    assert after["ref_chosen_elbo"] == before["ref_chosen_elbo"]  # the reference stays frozen


@pytest.mark.parametrize("layout", ["tp2", "cp2", "pp2"])
def test_dpo_loss_is_independent_of_the_parallel_layout(layouts, layout):
    ref = layouts[0]["tp1_dp2"]
    assert ref["loss"] < LOG2 - 1e-4  # policy != reference: a non-trivial value
    assert abs(ref["loss"] - layouts[0]["after_sgd"]["loss"]) < 1e-6  # w1 reloaded = w1 in memory
    for per_rank in layouts:
        got = per_rank[layout]
        assert got["pairs"] == ref["pairs"]
        for key in ("loss", "reward_margin", "chosen_elbo", "rejected_elbo", "ref_chosen_elbo", "ref_rejected_elbo"):
            assert math.isclose(got[key], ref[key], rel_tol=1e-5, abs_tol=1e-5), (layout, key, got[key], ref[key])


def test_precomputed_reference_matches_a_live_one(layouts):
    for per_rank in layouts:
        start = per_rank["precomputed_initial"]
        assert abs(start["loss"] - LOG2) < 1e-5  # the starting policy against its own cached ELBOs
        pairs = per_rank["cached_vs_live"]
        assert pairs and all(torch.allclose(cached, live, rtol=1e-5, atol=1e-4) for cached, live in pairs)
    cache = layouts[0]["precomputed_cache"]
    assert torch.equal(cache, layouts[1]["precomputed_cache"])  # every rank holds every pair's ELBOs
    assert cache.shape[1] == 2 and bool((cache < 0).all())  # every pair (train + valid) was filled


def test_bad_preference_lines_are_reported_with_line_numbers(tmp_path):
    from llada_cpt.errors import DataError
    from llada_cpt.stages.dpo import DPOStage

    bad = tmp_path / "pairs.jsonl"
    bad.write_text("\n".join([
        json.dumps({"prompt": "p", "chosen": "a"}),
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
        "{not json",
    ]) + "\n")
    cfg = small_config("dpo", f"dpo.data=[{bad}]")
    with pytest.raises(DataError) as err:
        DPOStage(cfg).prepare(cfg)
    msg = str(err.value)
    assert "no usable preference pairs" in msg and "\n" not in msg
    for line in (1, 2, 3):
        assert f"{bad}:{line}:" in msg


@pytest.fixture(scope="module")
def dpo_cli(tmp_path_factory):
    return dpo_run(tmp_path_factory.getbasetemp() / "stage_runs")


def test_dpo_cli_run_from_the_sft_checkpoint_lowers_the_loss(dpo_cli):
    assert dpo_cli["returncode"] == 0, dpo_cli["stderr"]
    out = dpo_cli["stdout"]
    # the learning rate defaults to the SFT run's final rate (cosine down to its min_lr)
    lr = re.search(r"learning rate ([0-9.e+-]+) from the final rate of the SFT checkpoint", out)
    assert lr and math.isclose(float(lr.group(1)), SFT_MIN_LR, rel_tol=1e-3), out[-3000:]
    assert re.search(r"dpo data \(.*\): \d+ samples from 61 lines", out)
    records = step_records(dpo_cli["save_dir"])
    assert [r["step"] for r in records] == list(range(1, DPO_STEPS + 1))
    assert abs(records[0]["loss"] - LOG2) < 1e-5  # step 1: policy == reference
    for key in ("reward_margin", "accuracy", "chosen_elbo", "rejected_elbo", "ref_chosen_elbo"):
        assert key in records[0]
    losses = [r["loss"] for r in records]
    half = DPO_STEPS // 2
    assert mean(losses[half:]) < min(LOG2, mean(losses[:half])), losses  # noisy per step (one ELBO sample)
    val = validation_losses(out)  # fixed noise: the clean signal
    assert abs(val[0] - LOG2) < 1e-4 and val[DPO_STEPS] < val[0] - 0.02, val  # printed to 4 digits
    save = dpo_cli["save_dir"]
    assert (save / "latest").read_text().strip() == f"iter_{DPO_STEPS:07d}"
    assert "stage: dpo" in (save / f"iter_{DPO_STEPS:07d}" / "config.yaml").read_text()

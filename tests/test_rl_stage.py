"""The RL stage end to end on 2 gloo ranks: rollouts from our sampler, dynamic sampling, TraceRL rows, PPO."""
import json
import math

import pytest
import torch

from dist import run_distributed
from run_helpers import REPO, assert_clean_error, cli, run

pytestmark = pytest.mark.timeout(600)


class LengthReward:
    """A reward the random demo model can earn: completions whose text length is even.

    The real math verifier never fires on an untrained model, so every group would be
    all-equal and dynamic sampling would skip every step; this keeps the update path busy.
    """

    def __init__(self):
        from llada_cpt.rl import MathVerifier

        self.verifier = MathVerifier()

    def batch(self, completions, ground_truths, step_maps=None, block_size=None):
        r = torch.tensor([float(len(c) % 2 == 0) for c in completions])
        z = torch.zeros_like(r)
        return {"total": r, "correctness": r, "format": z, "speed": z, "tokens_per_step": z + 1}


def _train_rl(rank, world, save_dir, overrides):
    from llada_cpt.config import load_config
    from llada_cpt.stages.rl import RLStage
    from llada_cpt.training.loop import train

    cfg = load_config(str(REPO / "configs" / "tiny_rl.yaml"), [f"checkpoint.save_dir={save_dir}", *overrides])
    cfg.stage = "rl"
    stage = RLStage(cfg)
    stage.reward = LengthReward()
    out = train(cfg, stage)
    return {k: v for k, v in out.items() if k != "history"}


@pytest.mark.parametrize("old_logprobs", ["recompute", "rollout"])
def test_rl_run_updates_logs_rewards_and_saves(tmp_path, old_logprobs):
    save = tmp_path / "rl"
    over = ["train.train_steps=2", "checkpoint.save_interval=2", "logging.eval_interval=0", "rl.max_new_tokens=8",
            "rl.threshold=0.5", "train.lr=1e-4", f"rl.old_logprobs={old_logprobs}"]
    results = run_distributed(_train_rl, 2, str(save), over, timeout=500)
    assert all(r["iteration"] == 2 for r in results)
    log = [json.loads(line) for line in (save / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # both steps found informative groups and updated
    first = log[0]
    for key in ("loss", "reward_mean", "reward_std", "accuracy", "response_length", "rollout_tpf", "clip_frac",
                "kl", "entropy", "ratio", "groups_drawn", "groups_kept", "groups_dropped"):
        assert key in first and math.isfinite(first[key]), key
    # recomputed old log-probs: the first update's ratio is exactly 1, nothing clipped.  Rollout log-probs come
    # from the sampler's KV-cached forwards: equal up to round-off only if the TraceRL rows replay exactly the
    # context the sampler saw when it committed each token
    tol = 1e-6 if old_logprobs == "recompute" else 1e-4
    assert first["ratio"] == pytest.approx(1.0, abs=tol) and first["clip_frac"] == 0.0
    assert first["groups_kept"] == 2 and first["groups_drawn"] >= 2
    assert 0 < first["reward_mean"] < 1 and first["response_length"] > 0
    assert (save / "latest").read_text().strip() == "iter_0000002"
    state = torch.load(save / "iter_0000002" / "common.pt", weights_only=False)["state"]
    assert state["stage"]["cursor"] >= 2  # the prompt stream position is checkpointed for resume


def test_unfillable_batches_are_skipped_not_fatal(tmp_path):
    """The untrained model never answers correctly: every group is all-equal and the step is skipped."""
    save = tmp_path / "rl"
    proc = run(cli("rl", "-c", "configs/tiny_rl.yaml", "--nproc", "2", f"checkpoint.save_dir={save}",
                   "train.train_steps=1", "logging.eval_interval=0", "rl.max_new_tokens=4", "rl.max_oversample=1.0"),
               cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped, no update (dynamic sampling: only 0 of the 1 required groups" in proc.stdout
    assert (save / "latest").read_text().strip() == "iter_0000001"


def test_block_size_mismatch_is_a_config_error(tmp_path):
    proc = run(cli("rl", "-c", "configs/tiny_rl.yaml", "--nproc", "2", f"checkpoint.save_dir={tmp_path / 'x'}",
                   "rl.block_size=8"), cwd=REPO, timeout=400)
    line = assert_clean_error(proc, "rl", "rl.block_size=8", "diffusion.block_schedule")
    assert "training block size 4" in line
    assert not (tmp_path / "x" / "latest").exists()

"""The RL stage end to end on 2 gloo ranks: rollouts from our sampler, dynamic sampling, TraceRL rows, PPO."""
import json
import math

import pytest
import torch

from dist import max_diff, run_distributed
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


# ----------------------------------------------- the PPO step: entropy gradients, context parallelism

def _trajectory_rows(stage, mask_id: int, advantages) -> list:
    """TraceRL rows of 4 synthetic rollouts (prompt + 12 tokens, 2 steps per block, 2 forwards each)."""
    from llada_cpt.rl import build_trajectory_inputs

    g = torch.Generator().manual_seed(3)
    B = stage.cfg.rl.block_size
    rows = []
    for k, adv in enumerate(advantages):
        prompt = torch.randint(5, 200, (7 + 3 * k,), generator=g)
        gen = torch.randint(5, 200, (12,), generator=g)
        P = prompt.numel()
        step_map = torch.tensor([2 * ((P + i) // B) + i % 2 for i in range(12)])
        traj = build_trajectory_inputs(prompt, gen, step_map, B, mask_id, 2)
        logp = torch.cat([torch.zeros(P), -torch.rand(12, generator=g)])
        rows += [{"x_t": traj.x_t[f], "x_0": traj.x_0, "target": traj.target[f], "advantage": adv,
                  "rollout_logp": logp} for f in range(traj.num_forwards)]
    return rows


def _hand_entropy_grads(run, batches) -> list:
    """grad of -(mean entropy over the target tokens of the global batch), from full-vocabulary logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from llada_cpt.model.wrappers import unwrap

    model = unwrap(run.model_chunks[0])
    names, params = zip(*model.named_parameters())
    tp = ps.get_tensor_model_parallel_world_size()
    total, count = torch.zeros(()), torch.zeros(())
    for b in batches:
        L = b.layout.seq_length
        logits = model(b.input_ids, b.layout.position_ids(local=True), attention_mask=b.layout)[:, :L].float()
        if tp > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        target = b.target[:, :L]
        total = total + entropy[target].sum()
        count = count + target.sum()
    grads = torch.autograd.grad(-total, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.detach().clone() for g, p in zip(grads, params)]
    group = ps.get_data_parallel_group()
    dist.all_reduce(count, group=group)
    for name, g in zip(names, grads):
        dist.all_reduce(g, group=group)
        if tp > 1 and ("q_layernorm" in name or "k_layernorm" in name):  # shared by the heads of all TP ranks:
            dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())  # summed as Megatron does
    return [g / count for g in grads]


def _ppo_step_layouts(rank: int, world: int, out: str) -> dict:
    """From the same weights and rows: TP1 x DP2, TP2 and CP2 (2 ranks).  Zero advantages with entropy_coef=1
    (TP1, TP2: stage vs hand gradients), and a PPO step with advantages and recomputed old log-probs
    (TP1 x DP2 vs CP2: loss and gradients)."""
    from llada_cpt.checkpoint import megatron as ckpt
    from llada_cpt.config import load_config
    from llada_cpt.rl import PPOConfig
    from llada_cpt.stages.rl import RLStage
    from llada_cpt.training.loop import build_run, run_step

    results = {}
    for layout, over in (("tp1", []), ("tp2", ["parallel.tensor_model_parallel_size=2"]),
                         ("cp2", ["parallel.context_parallel_size=2"])):
        init = [f"train.init_from={out}/w"] if layout != "tp1" else []
        cfg = load_config(str(REPO / "configs" / "tiny_rl.yaml"),
                          ["train.micro_batch_size=2", "train.global_batch_size=4",
                           "parallel.use_distributed_optimizer=false",
                           "rl.old_logprobs=recompute", *init, *over])
        cfg.stage = "rl"
        stage = RLStage(cfg)
        run = build_run(cfg, stage)
        if layout == "tp1":
            ckpt.save_checkpoint(f"{out}/w", 0, run.model_chunks, None, None, {}, cfg)
        L = cfg.data.seq_length
        pad = stage.tokenizer.pad_id if stage.tokenizer.pad_id is not None else stage.tokenizer.eod_id
        dp_rank, dp = run.dp_rank, run.dp_size
        for case, advantages, ppo in (("entropy", [0.0] * 4, PPOConfig(entropy_coef=1.0)),
                                      ("ppo", [1.0, -1.0, 0.5, -0.5], PPOConfig(entropy_coef=0.01))):
            rows = _trajectory_rows(stage, run.mask_id, advantages)
            mine = rows[dp_rank * len(rows) // dp:(dp_rank + 1) * len(rows) // dp]
            batches = [stage._batch(mine[i:i + 2], L, pad) for i in range(0, len(mine), 2)]
            stage.ppo = ppo
            run.optimizer.zero_grad()
            res = run_step(run, stage, batches, forward_only=False)
            grads = [p.main_grad.detach().clone() for c in run.model_chunks for p in c.parameters()]
            results[f"{layout}_{case}"] = {"loss": res.loss, "metrics": dict(res.metrics), "grads": grads}
            if case == "entropy" and layout != "cp2":
                results[f"{layout}_hand"] = _hand_entropy_grads(run, batches)
    return results


@pytest.fixture(scope="module")
def ppo_layouts(tmp_path_factory):
    return run_distributed(_ppo_step_layouts, 2, str(tmp_path_factory.mktemp("ppo_layouts")), timeout=600)


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_entropy_coef_trains_the_entropy(ppo_layouts, layout):
    """Zero advantages: the PPO gradient is exactly that of -entropy_coef * mean entropy over the targets."""
    for per_rank in ppo_layouts:
        got, want = per_rank[f"{layout}_entropy"]["grads"], per_rank[f"{layout}_hand"]
        scale = max(float(g.abs().max()) for g in want)
        assert scale > 0
        assert max_diff(got, want) <= 1e-4 * scale, max_diff(got, want) / scale


def test_rl_step_under_context_parallelism_equals_cp1(ppo_layouts):
    """Packed trajectory rows, recomputed old log-probs: CP=2 gives the loss, metrics and gradients of CP=1."""
    for per_rank in ppo_layouts:
        want, got = per_rank["tp1_ppo"], per_rank["cp2_ppo"]
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-5, abs_tol=1e-7), (got["loss"], want["loss"])
        for key, value in want["metrics"].items():
            assert math.isclose(got["metrics"][key], value, rel_tol=1e-5, abs_tol=1e-6), key
        assert want["metrics"]["ratio"] == pytest.approx(1.0, abs=1e-6)
        scale = max(float(g.abs().max()) for g in want["grads"])
        assert scale > 0 and max_diff(got["grads"], want["grads"]) <= 1e-5 * scale


def test_rl_run_under_context_parallelism(tmp_path):
    """Rollouts (every CP rank samples the same sequences), TraceRL rows split over CP=2, logged counts per
    replica (not per rank)."""
    save = tmp_path / "rl"
    over = ["train.train_steps=1", "checkpoint.save_interval=1", "logging.eval_interval=0", "rl.max_new_tokens=8",
            "rl.threshold=0.5", "train.lr=1e-4", "parallel.context_parallel_size=2", "train.global_batch_size=8"]
    results = run_distributed(_train_rl, 2, str(save), over, timeout=500)
    assert all(r["iteration"] == 1 for r in results)
    (first,) = [json.loads(line) for line in (save / "train_log.jsonl").read_text().splitlines()]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["groups_kept"] == 2
    assert math.isfinite(first["loss"]) and first["grad_norm"] > 0

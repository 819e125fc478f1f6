"""Expert parallelism: MoE training with EP = 2 resumes with EP = 1 (and the losses continue the same).

Four gloo ranks, for two MoE variants of ``tiny-moe`` (4 experts, top-2, alltoall
dispatcher): the aux-loss router (softmax) and the aux-loss-free one (sigmoid
scores with a learned expert bias).  EP = 2 (x DP = 4) with the distributed
optimizer trains two steps, saves model and optimizer with ``dist_checkpointing``
(the optimizer through :mod:`llada_cpt.checkpoint.optimizer_state`, fully
reshardable) and trains two more; EP = 1 (x DP = 4) loads that checkpoint and
trains the same two steps: both losses must match, the second of which depends
on the resharded Adam moments; EP = 1's own checkpoint two steps later resumes
with EP = 2 the same way.  TP = 2 x EP = 2 runs the first checkpoint forward
only (Megatron's MoE refuses TP without sequence parallelism in training, and
sequence parallelism needs Transformer Engine) and must give the EP = 1 loss.
"""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch

from dist import run_distributed

L = 32
BLOCK = 4
VOCAB = 128
MASK_ID = VOCAB - 1
GLOBAL_BATCH = 4
MOE = dict(preset="tiny-moe", num_layers=2, make_vocab_size_divisible_by=64)
VARIANTS = {
    "aux_loss": dict(MOE),
    "expert_bias": dict(MOE, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                        moe_router_load_balancing_type="none"),
}
TOL = 1e-5


def _config(model: dict, **parallel):
    from llada_cpt.config.loader import config_from_dict

    return config_from_dict({
        "model": model,
        "parallel": dict(use_distributed_optimizer=True, **parallel),
        "train": dict(lr=1e-2, lr_warmup_steps=0, lr_decay_style="constant", micro_batch_size=1,
                      global_batch_size=GLOBAL_BATCH, train_steps=4, precision="fp32", seed=7),
        "data": dict(seq_length=L, demo=True),
        "diffusion": dict(block_schedule=[[BLOCK, 1]]),
    })


def _batch(step: int, dp_rank: int, dp_size: int):
    """This DP rank's rows of step ``step``'s global batch (packed, unaligned documents)."""
    from llada_cpt.diffusion.inputs import build_diffusion_batch

    g = torch.Generator().manual_seed(100 + step)
    x0 = torch.randint(0, VOCAB - 1, (GLOBAL_BATCH, L), generator=g)
    doc = torch.tensor([[0] * 11 + [1] * 21, [0] * 32, [0] * 5 + [1] * 13 + [2] * 14, [0] * 30 + [1] * 2])
    full = build_diffusion_batch(x0, doc, BLOCK, MASK_ID, generator=g)
    rows = list(range(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size))
    return build_diffusion_batch(x0[rows], doc[rows], BLOCK, MASK_ID, masked=full.masked[rows], t=full.t[rows])


def _build(cfg, optimizer: bool = True):
    from llada_cpt.model.provider import build_model
    from llada_cpt.training.distributed import initialize, wrap_ddp
    from llada_cpt.training.optimizer import build_optimizer, build_scheduler

    initialize(cfg.parallel, seed=cfg.train.seed)
    chunks = wrap_ddp(build_model(cfg.model, cfg.parallel, "fp32", VOCAB), cfg.parallel)
    if not optimizer:
        return chunks, None, None
    opt = build_optimizer(cfg, chunks, bf16=False)
    return chunks, opt, build_scheduler(cfg, opt)


def _train(chunks, opt, sched, steps) -> list:
    from megatron.core import parallel_state as ps

    from llada_cpt.training.step import forward_backward

    losses = []
    for step in steps:
        opt.zero_grad()
        res = forward_backward(chunks, [_batch(step, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())])
        ok, _, _ = opt.step()
        assert ok
        sched.step(increment=1)
        losses.append(res.loss)
    return losses


def _eval_loss(chunks, step: int) -> float:
    from megatron.core import parallel_state as ps

    from llada_cpt.training.step import forward_backward

    for c in chunks:
        c.eval()
    with torch.no_grad():
        batch = _batch(step, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        return forward_backward(chunks, [batch], forward_only=True).loss


def _experts(chunks) -> dict:
    from llada_cpt.model.wrappers import unwrap

    mlp = unwrap(chunks[0]).decoder.layers[1].mlp
    bias = getattr(mlp.router, "expert_bias", None)
    return {"local_experts": len(mlp.experts.local_experts),
            "expert_bias": None if bias is None else bias.detach().clone()}


def _save(path: str, chunks, opt) -> None:
    """Model + optimizer as ``checkpoint/megatron.py`` should store them (see the module docstring)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from llada_cpt.checkpoint.optimizer_state import OPTIM_METADATA, optimizer_sharded_state_dict
    from llada_cpt.model.wrappers import unwrap

    if dist.get_rank() == 0:
        os.makedirs(path)
    dist.barrier()
    sharded = {"model": unwrap(chunks[0]).sharded_state_dict()}
    sharded["optimizer"] = optimizer_sharded_state_dict(opt, sharded, is_loading=False)
    dist_checkpointing.save(sharded, path, content_metadata=OPTIM_METADATA)


def _load(path: str, chunks, opt=None) -> None:
    from megatron.core import dist_checkpointing

    from llada_cpt.checkpoint.optimizer_state import load_optimizer_state, optimizer_sharded_state_dict
    from llada_cpt.model.wrappers import unwrap

    sharded = {"model": unwrap(chunks[0]).sharded_state_dict()}
    if opt is not None:
        sharded["optimizer"] = optimizer_sharded_state_dict(opt, sharded, is_loading=True)
    loaded = dist_checkpointing.load(sharded, path)
    unwrap(chunks[0]).load_state_dict(loaded["model"])
    if opt is not None:
        load_optimizer_state(opt, loaded["optimizer"])


def _variant(out: str, name: str, model: dict) -> dict:
    """EP 2 -> 1 -> 2 through checkpoints A (after step 2) and B (after step 4); TP 2 x EP 2 reads A."""
    ep2, ep1 = _config(model, expert_model_parallel_size=2), _config(model)
    chunks, opt, sched = _build(ep2)
    _train(chunks, opt, sched, [1, 2])
    _save(f"{out}/{name}_A", chunks, opt)
    saved = _experts(chunks)
    result = {"ep2": {"next": _train(chunks, opt, sched, [3, 4]), **saved}}

    chunks, opt, sched = _build(ep1)
    _load(f"{out}/{name}_A", chunks, opt)
    info = _experts(chunks)
    eval_loss = _eval_loss(chunks, 3)
    for c in chunks:
        c.train()
    result["ep1"] = {"eval": eval_loss, "next": _train(chunks, opt, sched, [3, 4]), **info}
    _save(f"{out}/{name}_B", chunks, opt)
    result["ep1"]["after"] = _train(chunks, opt, sched, [5, 6])

    chunks, opt, sched = _build(ep2)
    _load(f"{out}/{name}_B", chunks, opt)
    result["ep2_from_ep1"] = {"next": _train(chunks, opt, sched, [5, 6])}

    chunks, _, _ = _build(_config(model, tensor_model_parallel_size=2, expert_model_parallel_size=2), optimizer=False)
    _load(f"{out}/{name}_A", chunks)
    result["tp2ep2"] = {"eval": _eval_loss(chunks, 3), **_experts(chunks)}
    return result


def _worker(rank: int, world: int, out: str) -> dict:
    return {name: _variant(out, name, model) for name, model in VARIANTS.items()}


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as out:
        return run_distributed(_worker, 4, out)


def _close(a: float, b: float) -> bool:
    return math.isfinite(a) and abs(a - b) <= TOL * abs(a)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ep2_checkpoint_resumes_with_ep1_and_the_losses_continue(runs, variant):
    for rank_result in runs:
        r = rank_result[variant]
        assert (r["ep2"]["local_experts"], r["ep1"]["local_experts"]) == (2, 4)
        ep2, ep1 = r["ep2"]["next"], r["ep1"]["next"]
        assert ep2[0] != ep2[1]  # the optimizer moved the weights between the two compared steps
        assert _close(ep2[0], ep1[0]) and _close(ep2[1], ep1[1]), (ep2, ep1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ep1_checkpoint_resumes_with_ep2(runs, variant):
    """The other direction: the expert part of the optimizer is rebuilt from the dense one's settings."""
    for rank_result in runs:
        r = rank_result[variant]
        ep1, ep2 = r["ep1"]["after"], r["ep2_from_ep1"]["next"]
        assert _close(ep1[0], ep2[0]) and _close(ep1[1], ep2[1]), (ep1, ep2)


def test_aux_loss_free_expert_bias_is_learned_and_resharded(runs):
    for rank_result in runs:
        r = rank_result["expert_bias"]
        saved, loaded = r["ep2"]["expert_bias"], r["ep1"]["expert_bias"]
        assert saved.abs().max() > 0  # updated from the global token counts at every step
        assert torch.equal(saved, loaded)
        assert torch.equal(saved, runs[0]["expert_bias"]["ep2"]["expert_bias"])  # one bias on every rank
    assert runs[0]["aux_loss"]["ep2"]["expert_bias"] is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_ep2_forward_gives_the_ep1_loss(runs, variant):
    for rank_result in runs:
        r = rank_result[variant]
        assert r["tp2ep2"]["local_experts"] == 2
        assert _close(r["ep1"]["eval"], r["tp2ep2"]["eval"]), (r["ep1"]["eval"], r["tp2ep2"]["eval"])


def test_moe_with_tensor_parallelism_needs_sequence_parallelism():
    from llada_cpt.config import config_from_dict, validate
    from llada_cpt.errors import ConfigError

    def cfg(**parallel):
        return config_from_dict({"model": {"preset": "tiny-moe"}, "data": {"demo": True, "seq_length": 128},
                                 "parallel": parallel, "train": {"micro_batch_size": 1, "global_batch_size": 4}})

    validate(cfg(expert_model_parallel_size=2), world_size=4)
    validate(cfg(tensor_model_parallel_size=2, expert_model_parallel_size=2, sequence_parallel=True), world_size=4)
    with pytest.raises(ConfigError, match="needs parallel.sequence_parallel=true"):
        validate(cfg(tensor_model_parallel_size=2, expert_model_parallel_size=2), world_size=4)

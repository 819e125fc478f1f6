"""Loss and gradients do not depend on the parallel layout (TP, PP, DP, micro-batching).

A one-rank reference builds the model, saves its weights with
``dist_checkpointing`` and runs the global batch as 1 and as 4 micro-batches.
Two gloo ranks then run the same global batch as TP=2, PP=2 (1F1B schedule) and
DP=2, each loading the reference weights with resharding.  Gradients are saved
as a checkpoint too (``main_grad`` in place of the weights), so Megatron's own
resharding puts every layout's gradients into one global form for comparison.
An MoE model with EP=2 (alltoall dispatcher) must give the EP=1 loss; a DP=2 run
with the distributed optimizer resumed from a checkpoint must continue exactly
like the unbroken run; fresh TP=2 shards come from TP-rank-specific RNG streams.
"""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch

from dist import load_model_and_optimizer, run_distributed, save_model_and_optimizer
from llada_cpt.config.schema import ModelConfig, ParallelConfig

L = 16
BLOCK = 4
VOCAB = 128  # a multiple of divisible_by * tp for tp <= 2: the padded vocab is layout-independent
MASK_ID = VOCAB - 1
GLOBAL_BATCH = 4
MODEL = dict(
    num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    qk_layernorm=True, make_vocab_size_divisible_by=64,
)
MOE = dict(MODEL, num_layers=2, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
           moe_shared_expert_intermediate_size=48, moe_first_dense_layers=1)
TOL = 1e-5
# gradients are compared after DDP's all-reduce; the distributed optimizer would reduce-scatter them
PLAIN_DDP = dict(use_distributed_optimizer=False)


def _global_batch():
    """Four packed sequences (documents of unaligned lengths), one set of masks."""
    from llada_cpt.diffusion.inputs import build_diffusion_batch

    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, VOCAB - 1, (GLOBAL_BATCH, L), generator=g)
    doc = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16, [0] * 9 + [1] * 7, [0] * 3 + [1] * 13])
    return build_diffusion_batch(x0, doc, BLOCK, MASK_ID, generator=g)


def _micro_batches(rows, mbs: int):
    """Split the chosen rows of the global batch into micro-batches of ``mbs`` sequences."""
    from llada_cpt.diffusion.inputs import build_diffusion_batch

    full = _global_batch()
    out = []
    for i in range(0, len(rows), mbs):
        r = list(rows[i : i + mbs])
        x0 = full.labels[r, :L]
        out.append(build_diffusion_batch(x0, full.layout.doc_ids[r], BLOCK, MASK_ID,
                                         masked=full.masked[r], t=full.t[r]))
    return out


def _setup(parallel: ParallelConfig, model_kw: dict, weights: str | None):
    from megatron.core import dist_checkpointing

    from llada_cpt.model.provider import build_model
    from llada_cpt.training.distributed import initialize, wrap_ddp

    initialize(parallel, seed=42)
    chunks = build_model(ModelConfig(**model_kw), parallel, "fp32", vocab_size=VOCAB)
    (model,) = chunks
    if weights is not None:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), weights))
    return model, wrap_ddp(chunks, parallel)


def _save(model, directory: str, grads: bool = False) -> None:
    """Save weights, or the reduced gradients in their place, as a sharded checkpoint."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(directory)
    dist.barrier()
    params = list(model.parameters())
    kept = [p.data for p in params]
    if grads:
        for p in params:
            p.data = p.main_grad.view_as(p)
    try:
        dist_checkpointing.save(model.sharded_state_dict(), directory)
    finally:
        for p, data in zip(params, kept):
            p.data = data


def _plain(directory: str) -> dict:
    from megatron.core import dist_checkpointing

    return {k: v.clone() for k, v in dist_checkpointing.load_plain_tensors(directory).items()}


def _step(ddp, batches):
    from llada_cpt.training.step import forward_backward

    return forward_backward(ddp, batches)


def _reference(rank: int, world: int, out: str) -> dict:
    model, ddp = _setup(ParallelConfig(**PLAIN_DDP), MODEL, None)
    _save(model, f"{out}/weights")
    results = {}
    for name, mbs in (("ref", GLOBAL_BATCH), ("mb4", 1)):
        res = _step(ddp, _micro_batches(range(GLOBAL_BATCH), mbs))
        _save(model, f"{out}/grads_{name}", grads=True)
        results[name] = {"loss": res.loss, "count": res.num_eligible, "grads": _plain(f"{out}/grads_{name}")}
    moe, moe_ddp = _setup(ParallelConfig(**PLAIN_DDP), MOE, None)
    _save(moe, f"{out}/moe_weights")
    results["moe_ep1"] = {"loss": _step(moe_ddp, _micro_batches(range(GLOBAL_BATCH), 2)).loss}
    return results


def _two_ranks(rank: int, world: int, out: str) -> dict:
    from megatron.core import parallel_state

    layouts = {
        "tp2": (ParallelConfig(tensor_model_parallel_size=2, **PLAIN_DDP), 2, lambda dp: range(GLOBAL_BATCH)),
        "pp2": (ParallelConfig(pipeline_model_parallel_size=2, **PLAIN_DDP), 1, lambda dp: range(GLOBAL_BATCH)),
        "dp2": (ParallelConfig(**PLAIN_DDP), 2, lambda dp: range(2 * dp, 2 * dp + 2)),
    }
    results = {}
    for name, (parallel, mbs, rows) in layouts.items():
        model, ddp = _setup(parallel, MODEL, f"{out}/weights")
        res = _step(ddp, _micro_batches(rows(parallel_state.get_data_parallel_rank()), mbs))
        _save(model, f"{out}/grads_{name}", grads=True)
        results[name] = {"loss": res.loss, "count": res.num_eligible, "grads": _plain(f"{out}/grads_{name}")}
    # the distributed optimizer's reduce-scatter path of DDP, on gloo
    moe, moe_ddp = _setup(ParallelConfig(expert_model_parallel_size=2, use_distributed_optimizer=True), MOE,
                          f"{out}/moe_weights")
    dp = parallel_state.get_data_parallel_rank()
    res = _step(moe_ddp, _micro_batches(range(2 * dp, 2 * dp + 2), 2))
    results["moe_ep2"] = {"loss": res.loss, "aux": res.aux_losses,
                          "local_experts": len(moe.decoder.layers[1].mlp.experts.local_experts)}
    results["resume"] = _resume(out)
    results["tp_init"] = _fresh_init(ParallelConfig(tensor_model_parallel_size=2, **PLAIN_DDP))
    return results


def _fresh_init(parallel: ParallelConfig) -> dict:
    """Weights of a freshly initialised model (same local names on both ranks)."""
    model, _ = _setup(parallel, MODEL, None)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "linear_qkv.weight" in n or "linear_fc2" in n}


def _resume(out: str) -> dict:
    """DP=2 + distributed optimizer (torch AdamW here): a run resumed from a checkpoint
    continues exactly like the unbroken run (per-parameter Adam ``step`` state)."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    parallel = ParallelConfig(use_distributed_optimizer=True)

    def build(weights):
        model, ddp = _setup(parallel, MODEL, weights)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), ddp)
        return model, ddp, opt

    def train(ddp, opt, steps):
        dp = parallel_state.get_data_parallel_rank()
        losses = []
        for _ in range(steps):
            losses.append(_step(ddp, _micro_batches(range(2 * dp, 2 * dp + 2), 1)).loss)
            opt.step()
        return losses

    model, ddp, opt = build(f"{out}/weights")
    unbroken = train(ddp, opt, 2)
    save_model_and_optimizer(model, opt, f"{out}/resume")
    unbroken += train(ddp, opt, 2)

    model, ddp, opt = build(f"{out}/weights")  # fresh objects, then the checkpoint
    load_model_and_optimizer(model, opt, f"{out}/resume")
    return {"unbroken": unbroken, "resumed": train(ddp, opt, 2)}


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as out:
        ref = run_distributed(_reference, 1, out)[0]
        two = run_distributed(_two_ranks, 2, out)
    return ref, two


def _assert_same_grads(ref: dict, other: dict):
    assert sorted(ref) == sorted(other)
    for key, want in ref.items():
        got = other[key]
        assert got.shape == want.shape, key
        scale = want.abs().max().item()
        assert scale > 0, f"no gradient reached {key}"
        rel = (got - want).abs().max().item() / scale
        assert rel <= TOL, f"{key}: relative gradient difference {rel:.2e}"


def _assert_same_loss(a: float, b: float):
    assert math.isfinite(a) and abs(a - b) <= TOL * abs(a), (a, b)


def test_micro_batching_does_not_change_loss_or_grads(runs):
    ref, _ = runs
    assert ref["ref"]["count"] == ref["mb4"]["count"] == GLOBAL_BATCH * L
    _assert_same_loss(ref["ref"]["loss"], ref["mb4"]["loss"])
    _assert_same_grads(ref["ref"]["grads"], ref["mb4"]["grads"])


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_parallel_layout_gives_reference_loss_and_grads(runs, layout):
    ref, two = runs
    for rank_result in two:  # every rank reports the global loss
        assert rank_result[layout]["count"] == GLOBAL_BATCH * L
        _assert_same_loss(ref["ref"]["loss"], rank_result[layout]["loss"])
    _assert_same_grads(ref["ref"]["grads"], two[0][layout]["grads"])


def test_moe_expert_parallel_gives_reference_loss(runs):
    ref, two = runs
    for rank_result in two:
        r = rank_result["moe_ep2"]
        assert r["local_experts"] == MOE["num_experts"] // 2
        assert r["aux"].get("load_balancing_loss", 0.0) > 0
        _assert_same_loss(ref["moe_ep1"]["loss"], r["loss"])


def test_distributed_optimizer_resume_is_exact(runs):
    _, two = runs
    for rank_result in two:
        r = rank_result["resume"]
        assert r["unbroken"][0] > r["unbroken"][-1]  # it trains
        assert r["resumed"] == r["unbroken"][2:]


def test_tensor_parallel_init_differs_between_tp_ranks(runs):
    """TP shards are drawn from the TP-rank streams of the (CPU-backed) RNG tracker."""
    _, two = runs
    a, b = two[0]["tp_init"], two[1]["tp_init"]
    assert a and sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape and not torch.equal(a[name], b[name]), name

"""The fast optimizer path (fused AdamW, ``_foreach`` grad norm and clipping) equals Megatron's default.

Without TE/apex Megatron-Core uses torch AdamW (foreach / per tensor), a grad norm with
one host copy per tensor and clipping by per-tensor copies.  ``megatron_patches.torch_optimizer``
replaces those; here two gloo ranks train the same model three steps both ways, as DP=2
with the distributed optimizer and as TP=2 with the plain fp32 optimizer, with clipping
off (clip_grad=0), never triggered (norm computed, large threshold) and triggered on every
step: the parameters (1e-6 relative; measured <= 8e-8) and the grad norms must agree.  The
learning rate is a realistic 1e-3: Adam turns float noise in mathematically zero gradients
(e.g. x_0 tokens no loss sees) into updates of up to ~lr, so at 1e-2 single elements differed
by 2e-5 after three steps between *any* two Adam implementations.  The fused kernel runs
on CPU here (torch has a CPU fused AdamW); on GPU it is the default.
"""
from __future__ import annotations

import pytest
import torch

from dist import load_model_and_optimizer, run_distributed, save_model_and_optimizer
from llada_cpt.config.schema import Config, ModelConfig, ParallelConfig

L = 16
VOCAB = 128
MODEL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
             make_vocab_size_divisible_by=64)
LAYOUTS = {
    "dp2_distributed_optimizer": ParallelConfig(use_distributed_optimizer=True),
    "tp2": ParallelConfig(tensor_model_parallel_size=2, use_distributed_optimizer=False),
}
CLIPS = {"off": 0.0, "untriggered": 1e6, "triggered": 0.05}
STEPS = 3
LR = 1e-3


def _batches(dp_rank: int, dp_size: int, step: int):
    from llada_cpt.diffusion.inputs import build_diffusion_batch

    g = torch.Generator().manual_seed(100 + step)
    x0 = torch.randint(0, VOCAB - 1, (4, L), generator=g)
    doc = torch.tensor([[0] * 5 + [1] * 11, [0] * 16, [0] * 9 + [1] * 7, [0] * 3 + [1] * 13])
    full = build_diffusion_batch(x0, doc, 4, VOCAB - 1, generator=g)
    rows = list(range(4))[dp_rank::dp_size]
    return [build_diffusion_batch(full.labels[[r], :L], doc[[r]], 4, VOCAB - 1, masked=full.masked[[r]],
                                  t=full.t[[r]]) for r in rows]


def _train(rank: int, world: int, fast: bool) -> dict:
    from megatron.core import parallel_state

    from llada_cpt.megatron_patches import torch_optimizer
    from llada_cpt.model.provider import build_model
    from llada_cpt.training.distributed import initialize, wrap_ddp
    from llada_cpt.training.optimizer import build_optimizer
    from llada_cpt.training.step import forward_backward

    out = {}
    for layout, parallel in LAYOUTS.items():
        for clip_name, clip in CLIPS.items():
            initialize(parallel, seed=42)  # applies the patches (again)
            if not fast:
                torch_optimizer.revert()
            cfg = Config()
            cfg.parallel = parallel
            cfg.train.lr, cfg.train.clip_grad = LR, clip
            cfg.train.fused_adamw = fast  # the config switch (an explicit `fused=` argument would override it)
            (model,) = build_model(ModelConfig(**MODEL), parallel, "fp32", vocab_size=VOCAB)
            ddp = wrap_ddp([model], parallel)
            opt = build_optimizer(cfg, ddp, bf16=False)
            assert len(list(torch_optimizer.inner_torch_optimizers(opt))) >= 1
            dp, dps = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
            norms = []
            for step in range(STEPS):
                forward_backward(ddp, _batches(dp, dps, step))
                ok, norm, _ = opt.step()
                assert ok
                norms.append(norm)
            fused = [g.get("fused") for o in torch_optimizer.inner_torch_optimizers(opt) for g in o.param_groups]
            out[(layout, clip_name)] = {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "norms": norms,
                "fused": fused,
                "patched": torch_optimizer.apply() if fast else [],
            }
    return out


@pytest.fixture(scope="module")
def runs():
    default = run_distributed(_train, 2, False)
    fast = run_distributed(_train, 2, True)
    return default, fast


def test_fast_path_is_active_only_where_asked(runs):
    default, fast = runs
    for key in default[0]:
        assert not any(default[0][key]["fused"]) and all(fast[0][key]["fused"])
        assert set(fast[0][key]["patched"]) == {"foreach_grad_norm", "foreach_grad_scale"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("clip", list(CLIPS))
def test_fast_path_equals_megatron_default_after_three_steps(runs, layout, clip):
    default, fast = runs
    for rank in range(2):
        a, b = default[rank][(layout, clip)], fast[rank][(layout, clip)]
        assert b["norms"] == pytest.approx(a["norms"], rel=1e-6)  # 0.0 where Megatron skips the norm
        if clip == "triggered":
            assert min(a["norms"]) > 10 * CLIPS["triggered"]  # every step was clipped
        for name, pa in a["params"].items():
            rel = float((pa - b["params"][name]).norm() / pa.norm())
            assert rel <= 1e-6, f"{layout}/{clip} rank {rank} {name}: relative difference {rel:.2e}"


def test_foreach_kernels_match_the_local_stand_ins():
    from megatron.core import utils

    from llada_cpt.megatron_patches.torch_optimizer import foreach_l2_norm, foreach_scale

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) for s in [(3, 5), (7,), (2, 2, 2), (1,)]]
    ours, _ = foreach_l2_norm(0, None, [ts], False)
    # what utils.local_multi_tensor_l2_norm computes (it allocates on "cuda", so not callable here)
    theirs = torch.norm(torch.tensor([torch.norm(t) for t in ts]))
    assert ours.shape == (1,) and float(ours) == pytest.approx(float(theirs), rel=1e-6)
    for scale in (1.0, 0.25):
        src = [t.clone() for t in ts]
        dst_ours, dst_theirs = [torch.zeros_like(t) for t in ts], [torch.zeros_like(t) for t in ts]
        foreach_scale(0, None, [src, dst_ours], scale)
        utils.local_multi_tensor_scale(0, None, [src, dst_theirs], scale)
        assert all(torch.equal(x, y) for x, y in zip(dst_ours, dst_theirs))
    inplace = [t.clone() for t in ts]
    foreach_scale(0, None, [inplace, inplace], 0.5)
    assert all(torch.equal(x, t * 0.5) for x, t in zip(inplace, ts))


def _resume_fused(rank: int, world: int, out: str) -> dict:
    """DP=2, distributed optimizer, fused AdamW: a resumed run continues exactly like the unbroken one."""
    from megatron.core import parallel_state

    from llada_cpt.megatron_patches import torch_optimizer
    from llada_cpt.model.provider import build_model
    from llada_cpt.training.distributed import initialize, wrap_ddp
    from llada_cpt.training.optimizer import build_optimizer
    from llada_cpt.training.step import forward_backward

    parallel = LAYOUTS["dp2_distributed_optimizer"]

    def build(fused=True):
        initialize(parallel, seed=42)
        cfg = Config()
        cfg.parallel, cfg.train.lr, cfg.train.clip_grad = parallel, LR, CLIPS["triggered"]
        (model,) = build_model(ModelConfig(**MODEL), parallel, "fp32", vocab_size=VOCAB)
        ddp = wrap_ddp([model], parallel)
        return model, ddp, build_optimizer(cfg, ddp, bf16=False, fused=fused)

    def train(ddp, opt, steps):
        dp = parallel_state.get_data_parallel_rank()
        losses = []
        for step in steps:
            losses.append(forward_backward(ddp, _batches(dp, 2, step)).loss)
            opt.step()
        return losses

    model, ddp, opt = build()
    unbroken = train(ddp, opt, range(2))
    save_model_and_optimizer(model, opt, f"{out}/ckpt")
    unbroken += train(ddp, opt, range(2, 4))

    model, ddp, opt = build()
    load_model_and_optimizer(model, opt, f"{out}/ckpt")
    inner = list(torch_optimizer.inner_torch_optimizers(opt))
    fused = all(g["fused"] for o in inner for g in o.param_groups)
    steps = {float(s["step"]) for o in inner for s in o.state.values()}
    shared = len({id(s["step"]) for o in inner for s in o.state.values()}) < sum(len(o.state) for o in inner)
    resumed = train(ddp, opt, range(2, 4))
    model, ddp, opt = build(fused=False)  # train.fused_adamw=false: the fused checkpoint loads unfused
    load_model_and_optimizer(model, opt, f"{out}/ckpt")
    unfused = [g["fused"] for o in torch_optimizer.inner_torch_optimizers(opt) for g in o.param_groups]
    return {"unbroken": unbroken[2:], "resumed": resumed, "fused": fused, "steps": steps, "shared": shared,
            "unfused": unfused}


def test_fused_adamw_resumes_exactly_and_the_choice_survives_a_resume(tmp_path):
    for res in run_distributed(_resume_fused, 2, str(tmp_path)):
        assert res["fused"] and res["steps"] == {2.0} and not res["shared"]
        assert res["resumed"] == res["unbroken"]
        assert res["unfused"] and not any(res["unfused"])  # saved fused, loaded with fused_adamw=false


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_on_cuda_matches_default_and_survives_a_cpu_state_dict():
    """On the GPU: fused AdamW equals torch's default after 3 steps; loading a state saved by a non-fused
    optimizer (step on the host) keeps it fused, with step tensors on the device."""
    from types import SimpleNamespace

    from llada_cpt.megatron_patches.torch_optimizer import use_fused_adamw

    g = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(256, 64, device="cuda", generator=g), torch.randn(64, device="cuda", generator=g)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(STEPS)]

    def run(fused: bool):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
        if fused:
            assert use_fused_adamw(SimpleNamespace(optimizer=opt)) == 1
        for step in range(STEPS):
            for p, gr in zip(params, grads[step]):
                p.grad = gr.clone()
            opt.step()
        return params, opt

    plain, plain_opt = run(False)
    fused, fused_opt = run(True)
    for a, b in zip(plain, fused):
        assert float((a - b).norm() / a.norm()) <= 1e-6
    fused_opt.load_state_dict(plain_opt.state_dict())  # steps on the host, groups say fused=None
    assert all(gr["fused"] for gr in fused_opt.param_groups)
    assert all(s["step"].device.type == "cuda" for s in fused_opt.state.values())
    fused_opt.step()

"""``benchmarks/train_step.py --profile``: where one training step's time goes, by category and phase.

The categorisation is checked on kernel names seen on GPUs (cuBLAS/CUTLASS GEMMs, flash /
flex attention, NCCL, fused Adam, ...) and on the scopes a kernel runs in; a CPU smoke run
profiles real steps (CPU self times) with both heads and both optimizer paths toggled on one
model, at 1 and 2 micro-batches per step.
"""
from __future__ import annotations

import pytest

from conftest import load_script


@pytest.mark.parametrize("name,scopes,category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", ["aten::mm"], "GEMM"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", ["aten::mm"], "GEMM"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm>", [], "GEMM"),
    ("triton_tem_fused_0", ["aten::_some_op", "llada::attention"], "attention"),
    ("flash_fwd_kernel", [], "attention"),
    ("triton_tem_fused_zeros_1", ["FlexAttentionBackwardHOP"], "attention"),
    ("triton_tem_fused_2", ["CompiledFunctionBackward"], "attention"),  # flex backward without a scope
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7", ["aten::_scaled_dot_product_cudnn_attention"], "attention"),
    ("triton_poi_fused_add_mul_0", ["aten::add"], "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4>", ["aten::where", "aten::broadcast_tensors"], "elementwise"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", ["c10d::allreduce_"], "communication/sync"),
    ("Memcpy DtoH (Device -> Pinned)", ["aten::_local_scalar_dense"], "communication/sync"),
    ("void at::native::(anonymous)::fused_adam_kernel", ["aten::_fused_adamw_", "llada::optimizer"], "optimizer"),
    ("multi_tensor_apply_kernel", ["aten::_foreach_norm", "llada::optimizer"], "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4>", ["aten::mul", "llada::fwd_bwd"], "elementwise"),
    ("void at::native::rms_norm_kernel", ["aten::_fused_rms_norm"], "norm"),
    ("void at::native::reduce_kernel<512, 1>", ["aten::max", "llada::cross_entropy"], "cross-entropy"),
    ("void at::native::reduce_kernel<512, 1>", ["aten::sum", "_LinearCrossEntropyBackward"], "cross-entropy"),
    ("aten::mm", ["llada::cross_entropy"], "GEMM"),  # the LM head's GEMM stays a GEMM
    ("some_unknown_kernel", [], "other"),
])
def test_categories(name, scopes, category):
    train_step = load_script("benchmarks/train_step.py")
    assert train_step.categorize(name, scopes) == category


def _profile_smoke(rank: int, world_size: int, out_dir: str) -> dict:
    import json
    from pathlib import Path

    train_step = load_script("benchmarks/train_step.py")
    code = train_step.main(["--smoke", "--backends", "reference", "--block-sizes", "8", "--profile",
                            "--micro-batches", "1", "2", "--head", "megatron", "chunked",
                            "--optimizer", "megatron", "fast", "--out", out_dir])
    return {"code": code, "data": json.loads((Path(out_dir) / "train_step_smoke.json").read_text()),
            "md": (Path(out_dir) / "train_step_smoke.md").read_text()}


def test_profile_smoke_splits_each_variant_into_categories_and_phases(tmp_path):
    from dist import run_distributed

    (result,) = run_distributed(_profile_smoke, 1, str(tmp_path))
    assert result["code"] == 0
    rows = result["data"]["rows"]
    assert {(r["micro_batches"], r["head"], r["optimizer"]) for r in rows} == {
        (m, h, o) for m in (1, 2) for h in ("megatron", "chunked") for o in ("megatron", "fast")}
    for r in rows:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0
        prof = r["profile"]
        assert prof["device"] == "cpu"
        fwd, opt = prof["fwd_bwd"], prof["optimizer"]
        for cat in ("GEMM", "attention", "norm", "cross-entropy"):
            assert fwd[cat] > 0 and opt[cat] == 0, (cat, r)
        assert opt["optimizer"] > 0 and fwd["optimizer"] == 0
        for phase in ("fwd_bwd", "optimizer"):
            busy = sum(prof[phase].values())
            assert 0 < busy <= prof["wall_ms"][phase] * 1.05 + 0.5, (phase, busy, prof["wall_ms"])
    assert "| category | fwd+bwd | optimizer step | share |" in result["md"]
    assert "CPU self time (not a GPU figure)" in result["md"]

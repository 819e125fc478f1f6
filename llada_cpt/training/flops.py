"""Honest FLOP counting for MFU: linear layers over every input token (2L in BDLM; the LM
head over the x_t half only), attention only over the (query, key) pairs the mask allows."""
from __future__ import annotations

import torch

from ..config.schema import ModelConfig
from ..diffusion.layout import AttentionLayout
from ..parallel.work import position_cost

# dense bf16 peak of common accelerators (TFLOP/s), by substring of the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "B200": 2250.0}


def step_flops(model: ModelConfig, vocab_size: int, layouts: list[AttentionLayout],
               head_on_noised_half: bool = True) -> float:
    """Forward+backward FLOPs of one optimizer step over the given micro-batch layouts.

    ``head_on_noised_half``: the LM head runs on the x_t half of a ``[x_t ; x_0]`` input
    only (``training/step.py``; not under sequence parallelism).
    """
    h = model.hidden_size
    heads = model.num_attention_heads
    d = model.kv_channels or h // heads
    groups = model.num_query_groups or heads
    attn_proj = 2 * h * d * (heads + 2 * groups) + 2 * heads * d * h
    ffn = model.ffn_hidden_size or 4 * h
    dense_mlp = (2 * 3 if model.activation == "swiglu" else 2 * 2) * h * ffn
    if model.num_experts:
        moe_ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size or 4 * h
        moe_mlp = 2 * 3 * h * moe_ffn * model.moe_router_topk + 2 * h * model.num_experts
        if model.moe_shared_expert_intermediate_size:
            moe_mlp += 2 * 3 * h * model.moe_shared_expert_intermediate_size
        n_dense = model.moe_first_dense_layers
        mlp_total = n_dense * dense_mlp + (model.num_layers - n_dense) * moe_mlp
    else:
        mlp_total = model.num_layers * dense_mlp
    per_token = model.num_layers * attn_proj + mlp_total
    head = 2 * h * vocab_size
    total = 0.0
    for lay in layouts:
        pairs = float(position_cost(lay.doc_ids, lay.seq_length if lay.mdlm else lay.block_size).sum())
        tokens = lay.doc_ids.numel() * lay.num_copies
        head_tokens = lay.doc_ids.numel() if head_on_noised_half else tokens
        total += per_token * tokens + head * head_tokens + model.num_layers * 4 * d * heads * pairs
    return 3.0 * total  # backward = 2x forward


def device_peak_flops() -> float | None:
    """Peak FLOP/s of the local accelerator, None on CPU (MFU is then not reported)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None

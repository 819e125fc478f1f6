"""Unfused attention: explicit ``Q K^T``, mask, softmax, ``P V`` - the baseline fused kernels must beat.

Materialises the ``[b, heads, Sq, Sk]`` scores (what TE's unfused backend and a
plain PyTorch implementation do); the benchmark measures the memory the fused
backends save against it, and the GPU tests use its bf16 error as the yardstick
of an acceptable bf16 error.
"""
from __future__ import annotations

import torch

from llada_cpt.diffusion.layout import AttentionLayout

__all__ = ["unfused_attention"]


def unfused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, softmax_scale: float
) -> torch.Tensor:
    """Same contract as every backend; computes in the input dtype (softmax in float32)."""
    mask = layout.dense_mask(local_queries=True).to(q.device)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)

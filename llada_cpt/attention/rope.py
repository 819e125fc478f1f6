"""Rotary position embedding with explicit, document-restarting position ids.

Megatron's own RoPE rotates by the *sequence index*; the block-diffusion input
``[x_t ; x_0]`` needs the same positions in both halves, restarting at 0 in every
packed document, so the attention module applies RoPE itself (after QK-norm).
Convention: "rotate half" with ``inv_freq = base^(-2i/d)`` and ``cos``/``sin``
concatenated twice, as in Hugging Face Llama/Qwen, so converted checkpoints
need no permutation of the q/k projections.
"""
from __future__ import annotations

import torch

__all__ = ["inverse_frequencies", "rotary_cos_sin", "rotate_half", "apply_rotary"]


def inverse_frequencies(head_dim: int, base: float, device=None) -> torch.Tensor:
    """``base^(-2i/d)`` for ``i < d/2`` (float32)."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
    return 1.0 / (base**exponent)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` of shape ``[s, b, 1, d]`` (float32) for ``position_ids`` ``[b, s]``."""
    inv_freq = inverse_frequencies(head_dim, base, device=position_ids.device)
    freqs = position_ids.transpose(0, 1).float().unsqueeze(-1) * inv_freq  # [s, b, d/2]
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)  # [s, b, 1, d]
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[s, b, heads, d]``; ``cos``/``sin`` are cast to ``x.dtype`` as in HF."""
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin

"""Rotary position embedding with explicit, document-restarting position ids.

Megatron's own RoPE rotates by the *sequence index*; the block-diffusion input
``[x_t ; x_0]`` needs the same positions in both halves, restarting at 0 in every
packed document, so the attention module applies RoPE itself (after QK-norm).
Convention: "rotate half" with ``inv_freq = base^(-2i/d)`` and ``cos``/``sin``
concatenated twice, as in Hugging Face Llama/Qwen, so converted checkpoints
need no permutation of the q/k projections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Llama3RopeScaling", "inverse_frequencies", "rotary_cos_sin", "rotate_half", "apply_rotary"]


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1+ frequency-dependent RoPE scaling (HF ``rope_type: llama3``).

    Why: those checkpoints were trained with it; leaving it out shifts every low
    frequency and the imported model is no longer the same function.  Wavelengths
    longer than ``original / low_freq_factor`` are slowed by ``factor``, shorter than
    ``original / high_freq_factor`` kept, and the band between interpolated.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        original = float(self.original_max_position_embeddings)
        low_wavelen = original / self.low_freq_factor
        high_wavelen = original / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (original / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)


def inverse_frequencies(head_dim: int, base: float, device=None,
                        scaling: Optional[Llama3RopeScaling] = None) -> torch.Tensor:
    """``base^(-2i/d)`` for ``i < d/2`` (float32), then ``scaling`` if any."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponent)
    return inv_freq if scaling is None else scaling.apply(inv_freq)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float,
                   scaling: Optional[Llama3RopeScaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` of shape ``[s, b, 1, d]`` (float32) for ``position_ids`` ``[b, s]``."""
    inv_freq = inverse_frequencies(head_dim, base, device=position_ids.device, scaling=scaling)
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

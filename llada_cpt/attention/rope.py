"""Rotary position embedding with explicit, document-restarting position ids.

Megatron's own RoPE rotates by the *sequence index*; the block-diffusion input
``[x_t ; x_0]`` needs the same positions in both halves, restarting at 0 in every
packed document, so the attention module applies RoPE itself (after QK-norm).
Convention: "rotate half" with ``inv_freq = base^(-2i/d)`` and ``cos``/``sin``
concatenated twice, as in Hugging Face Llama/Qwen, so converted checkpoints
need no permutation of the q/k projections.

Every layer of a step rotates by the same positions, so :func:`rotary_tables`
computes ``cos``/``sin`` once per layout (through a per-layout cache, in the
activation dtype) and :func:`rotate_qk` applies them to q and k in one
compiled kernel each on CUDA (``LLADA_ROPE_COMPILE=0`` turns that off), eagerly
elsewhere.  ``LLADA_ROPE_CACHE=0`` recomputes the tables in every layer (both
switches are read at every call, so a benchmark can compare in one process).  The compiled kernel computes in
float32 and rounds once, so on CUDA it differs from the eager bf16 chain by rounding only.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..diffusion.layout import AttentionLayout
from ..kernels.layout_cache import LayoutCache

__all__ = [
    "Llama3RopeScaling",
    "inverse_frequencies",
    "rotary_cos_sin",
    "rotate_half",
    "apply_rotary",
    "ROTARY_CACHE",
    "rotary_tables",
    "rotate_qk",
]

ROTARY_CACHE = LayoutCache()


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


def rotary_tables(layout: AttentionLayout, local: bool, head_dim: int, base: float,
                  scaling: Optional[Llama3RopeScaling], device: torch.device,
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` ``[s, b, 1, d]`` in ``dtype`` of the layout's (local or all) positions.

    Built once per layout and reused by every layer (and by activation
    recomputation); the values equal :func:`rotary_cos_sin` cast as in
    :func:`apply_rotary`.
    """
    def build():
        cos, sin = rotary_cos_sin(layout.position_ids(local=local).to(device), head_dim, base, scaling)
        return cos.to(dtype), sin.to(dtype)

    if os.environ.get("LLADA_ROPE_CACHE", "1") == "0":  # per-layer recomputation, to measure the saving
        return build()
    key = ("rope", bool(local), int(head_dim), float(base), scaling, str(device), dtype)
    return ROTARY_CACHE.get(layout, key, build)


def _rotate_pair(query: torch.Tensor, key: torch.Tensor, q_cos: torch.Tensor, q_sin: torch.Tensor,
                 k_cos: torch.Tensor, k_sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary(query, q_cos, q_sin), apply_rotary(key, k_cos, k_sin)


@functools.lru_cache(maxsize=None)
def _compiled_rotate_pair():
    return torch.compile(_rotate_pair)


def _use_compile(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("LLADA_ROPE_COMPILE", "1") != "0"


def rotate_qk(query: torch.Tensor, key: torch.Tensor, q_tables: Tuple[torch.Tensor, torch.Tensor],
              k_tables: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rotary` of ``query`` and ``key`` (``[s, b, heads, d]``): compiled on CUDA, eager elsewhere."""
    fn = _compiled_rotate_pair() if _use_compile(query.device) else _rotate_pair
    return fn(query, key, *q_tables, *k_tables)

"""The BDLM mask as an additive bias (cuDNN SDPA, TE ``post_scale_bias``) or a boolean "masked out" tensor.

Both are ``[b, 1, Sq, Sk]``: broadcast over heads, so the kernels never hold a
per-head score matrix, and cached per layout (:class:`LayoutCache`) so the
layers of a step share one copy.
"""
from __future__ import annotations

import torch

from llada_cpt.diffusion.layout import AttentionLayout

from .layout_cache import LayoutCache

__all__ = ["MASKED_BIAS", "BIAS_CACHE", "additive_mask", "bias_for", "masked_out_for"]

# finite "minus infinity" representable in fp16 and bf16 (torch's own choice for cuDNN,
# which mishandles -inf biases); no BDLM query row is fully masked, so it acts as -inf
MASKED_BIAS = -65504.0
_ROWS_PER_CHUNK = 2048  # bound the boolean temporaries while building
_ALIGN = 8  # keys per row padded to 16 bytes (bf16/fp16) for cuDNN's stride rules
BIAS_CACHE = LayoutCache(maxsize=2)


def additive_mask(layout: AttentionLayout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[b, 1, Sq, Sk]``: 0 where the layout allows a (query, key) pair, :data:`MASKED_BIAS` elsewhere.

    Rows are stored padded to a multiple of 8 keys (the result may be a view) and
    built in chunks of query rows, so the boolean temporaries stay small.
    """
    device = torch.device(device)
    q_index = layout.global_index(True)
    k_index = layout.global_index(False)
    b, sq, sk = layout.doc_ids.shape[0], q_index.numel(), k_index.numel()
    padded = -(-sk // _ALIGN) * _ALIGN
    bias = torch.empty(b, 1, sq, padded, dtype=dtype, device=device)[..., :sk]
    zero = torch.zeros((), dtype=dtype, device=device)
    masked = torch.full((), MASKED_BIAS, dtype=dtype, device=device)
    for start in range(0, sq, _ROWS_PER_CHUNK):
        rows = q_index[start:start + _ROWS_PER_CHUNK]
        allowed = layout.allowed(rows, k_index).to(device)
        bias[:, 0, start:start + rows.numel()] = torch.where(allowed, zero, masked)
    return bias


def bias_for(layout: AttentionLayout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`additive_mask` through the per-step cache."""
    device = torch.device(device)
    return BIAS_CACHE.get(layout, ("bias", str(device), str(dtype)), lambda: additive_mask(layout, dtype, device))


def masked_out_for(layout: AttentionLayout, device: torch.device) -> torch.Tensor:
    """``[b, 1, Sq, Sk]`` bool, True where attention is *not* allowed (TE's "arbitrary" convention)."""
    device = torch.device(device)
    return BIAS_CACHE.get(
        layout, ("masked_out", str(device)), lambda: ~layout.dense_mask(local_queries=True).to(device)
    )

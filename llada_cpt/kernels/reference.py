"""The reference attention backend: PyTorch SDPA on the dense boolean mask.

Slow and memory-hungry (it materialises ``[b, 1, Sq, Sk]``), but it evaluates the
binding mask definition directly and runs everywhere, so every fused backend is
tested against it.  The softmax runs in float32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llada_cpt.diffusion.layout import AttentionLayout

__all__ = ["reference_attention"]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, softmax_scale: float
) -> torch.Tensor:
    """``q`` ``[b, hq, Sq, d]``, ``k``/``v`` ``[b, hkv, Sk, d]`` -> ``[b, hq, Sq, d]``.

    Queries are the local tokens of ``layout`` and keys all tokens (in the order
    of :meth:`AttentionLayout.global_index`); ``hq`` must be a multiple of ``hkv`` (GQA).
    """
    mask = layout.dense_mask(local_queries=True).to(q.device)
    if mask.shape[-2:] != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"attention layout describes {tuple(mask.shape[-2:])} (queries, keys) but got "
            f"{q.shape[2]} queries and {k.shape[2]} keys"
        )
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=softmax_scale)
    return out.to(q.dtype)

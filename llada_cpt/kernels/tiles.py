"""Tile occupancy of a layout's mask: the work a block-sparse kernel cannot skip.

A fused kernel that skips empty ``tile x tile`` tiles (FlexAttention) does work in
proportion to the non-empty fraction; the benchmark's speed target is
``dense fused time x non-empty fraction``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from llada_cpt.diffusion.layout import AttentionLayout

__all__ = ["ATTENTION_TILE", "tile_occupancy"]

ATTENTION_TILE = 128  # query and key tile of the block-sparse kernels (FlexAttention's default sparse block)


def tile_occupancy(layout: AttentionLayout, tile: int = 128, device: Optional[torch.device] = None,
                   rows_per_chunk: int = 2048) -> Tuple[float, float]:
    """``(non-empty, full)`` fractions of the ``tile x tile`` tiles of ``layout.dense_mask()``.

    Averaged over the batch; partial edge tiles count as tiles.  Built in chunks
    of query rows, so ``[Sq, Sk]`` is never held at once.
    """
    device = torch.device(device) if device is not None else layout.doc_ids.device
    q_index = layout.global_index(True)
    k_index = layout.global_index(False)
    sk = k_index.numel()
    nk = -(-sk // tile)
    chunk = max(tile, rows_per_chunk // tile * tile)
    nonempty = full = total = 0
    for start in range(0, q_index.numel(), chunk):
        allowed = layout.allowed(q_index[start:start + chunk], k_index).to(device)  # [b, r, sk]
        b, r, _ = allowed.shape
        nq = -(-r // tile)
        padded = torch.zeros(b, nq * tile, nk * tile, dtype=torch.int32, device=device)
        valid = torch.zeros_like(padded)
        padded[:, :r, :sk] = allowed.to(torch.int32)
        valid[:, :r, :sk] = 1
        counts = padded.view(b, nq, tile, nk, tile).sum(dim=(2, 4))
        sizes = valid.view(b, nq, tile, nk, tile).sum(dim=(2, 4))
        nonempty += int((counts > 0).sum())
        full += int((counts == sizes).sum())
        total += b * nq * nk
    return nonempty / total, full / total

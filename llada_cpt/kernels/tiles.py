"""Tiles of a layout's mask: the work a block-sparse kernel cannot skip.

A fused kernel that skips empty ``q_tile x kv_tile`` tiles (FlexAttention, and
FA4 / block-sparse kernels later) pays per non-empty tile, not per allowed
pair.  ``ATTENTION_TILE`` is the one tile size: the FlexAttention BlockMask
builder and the context-parallel split (which balances these tiles) import it.

The keys a query row may see are at most two intervals of the key axis
(DESIGN section 2; key indices are global, x_t keys ``[0, L)``, x_0 keys
``[L, 2L)``):

- x_t query in block ``[bs, be)`` of document ``[s, e)``: x_t keys ``[bs, be)``
  and x_0 keys ``L + [s, bs)`` (the earlier blocks of its document);
- x_0 query: x_0 keys ``L + [s, be)`` (block-causal);
- MDLM: ``[s, e)``; causal (block size 1 on x_0 alone): ``[s, p + 1)``.

So :func:`tile_counts` gets the allowed pairs of every tile from those
intervals by difference arrays along the key tiles, in ``O(rows + tiles)``
memory and time, never building a mask.  :func:`tile_occupancy` is the dense,
chunked count (the brute-force reference and the attention benchmark's figure).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.diffusion.masks import document_starts

__all__ = [
    "ATTENTION_TILE",
    "TileSize",
    "tile_pair",
    "key_intervals",
    "tile_counts",
    "layout_tile_counts",
    "tile_states",
    "tile_occupancy",
]

ATTENTION_TILE = 128  # query and key tile of the block-sparse kernels (FlexAttention's default sparse block)

TileSize = Union[int, Tuple[int, int]]


def tile_pair(tile: TileSize = ATTENTION_TILE) -> Tuple[int, int]:
    """``(q_tile, kv_tile)`` from an int (square tiles) or a pair."""
    pair = (tile, tile) if isinstance(tile, int) else tuple(int(t) for t in tile)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"tile must be a positive int or a (q_tile, kv_tile) pair, got {tile!r}")
    return pair


def _document_ends(doc_ids: torch.Tensor) -> torch.Tensor:
    """Exclusive end of each token's document (the reversed sequence's document start, mirrored)."""
    L = doc_ids.shape[-1]
    return L - document_starts(doc_ids.flip(-1)).flip(-1)


def key_intervals(layout: AttentionLayout, q_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Allowed keys of each query row: ``[b, n, 4]`` int32 ``(start1, end1, start2, end2)``.

    ``q_index`` are global indices into the model input (``layout.global_index``;
    None: every index in order); key indices are global too (all keys, in order).  Row ``r`` may see exactly
    ``[start1, end1) | [start2, end2)`` (an empty interval has ``start == end``);
    the two never overlap.  Equal to ``layout.allowed(q_index, all keys)`` (tested).
    """
    doc = layout.doc_ids
    b, L = doc.shape
    starts = document_starts(doc).to(torch.int32)
    ends = _document_ends(doc).to(torch.int32)
    # One row of (start1, end1, start2, end2) per input index, then one gather.
    table = torch.zeros(b, layout.num_copies * L, 4, dtype=torch.int32, device=doc.device)
    if layout.mdlm:
        table[..., 0], table[..., 1] = starts, ends
    elif layout.causal:
        table[..., 0] = starts
        table[..., 1] = torch.arange(1, L + 1, dtype=torch.int32, device=doc.device)
    else:
        block = min(layout.block_size, L)
        idx = torch.arange(L, dtype=torch.int32, device=doc.device)
        block_start = idx - (idx - starts) % block
        block_end = torch.minimum(block_start + block, ends)
        noised, clean = table[:, :L], table[:, L:]
        noised[..., 0], noised[..., 1] = block_start, block_end  # x_t: own block of x_t ...
        noised[..., 2], noised[..., 3] = starts + L, block_start + L  # ... and earlier blocks of x_0
        clean[..., 2], clean[..., 3] = starts + L, block_end + L  # x_0: blocks <= own of x_0
    return table if q_index is None else table[:, q_index.to(doc.device)]


def tile_counts(intervals: torch.Tensor, num_keys: int, tile: TileSize = ATTENTION_TILE) -> torch.Tensor:
    """Allowed pairs per ``(q_tile, kv_tile)`` tile: ``[b, nq, nk]`` int32 from :func:`key_intervals`.

    Query tiles are consecutive runs of ``q_tile`` rows (the last may be cut).
    An interval ``[s, e)`` adds ``head`` pairs to its first key tile, ``kv_tile``
    to every tile in between and ``tail`` to its last: four entries of a
    difference array along the key tiles, summed once.
    """
    q_tile, kv_tile = tile_pair(tile)
    b, n, _ = intervals.shape
    nq, nk = -(-n // q_tile), -(-num_keys // kv_tile)
    width = nk + 1  # one spare column for the end markers of the last tile
    device = intervals.device
    columns = intervals.to(torch.int32).permute(2, 0, 1).contiguous()  # [4, b, n]
    row = (torch.arange(b, device=device, dtype=torch.int32).view(b, 1) * nq
           + torch.arange(n, device=device, dtype=torch.int32) // q_tile) * width  # [b, n]
    diff = torch.zeros(b * nq * width, dtype=torch.int32, device=device)
    for s, e in (columns[0:2], columns[2:4]):
        if not bool((e > s).any()):
            continue  # e.g. the second interval of MDLM / causal rows
        first = (s // kv_tile).clamp_(max=nk - 1)
        last = torch.maximum((e - 1) // kv_tile, first)  # == first for an empty interval
        spans = last > first
        head = torch.minimum(e, (first + 1) * kv_tile).sub_(s)  # 0 for an empty interval
        middle = spans.to(torch.int32).mul_(kv_tile)
        tail = (e - last * kv_tile).mul_(spans)
        at_first = (row + first).view(-1)
        at_last = (row + last).view(-1)
        diff.index_add_(0, at_first, head.view(-1))
        diff.index_add_(0, at_first + 1, (middle - head).view(-1))
        diff.index_add_(0, at_last, (tail - middle).view(-1))
        diff.index_add_(0, at_last + 1, tail.view(-1).neg_())
    counts = diff.view(b * nq, width).cumsum(1, dtype=torch.int32)
    return counts[:, :nk].reshape(b, nq, nk)


def layout_tile_counts(layout: AttentionLayout, tile: TileSize = ATTENTION_TILE, local: bool = True) -> torch.Tensor:
    """:func:`tile_counts` of ``layout``'s (local, or all) queries against all keys."""
    q_index = layout.global_index(local)
    return tile_counts(key_intervals(layout, q_index), layout.global_index(False).numel(), tile)


def tile_states(counts: torch.Tensor, tile: TileSize = ATTENTION_TILE) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` boolean ``[b, nq, nk]``: some but not all / all of a whole tile's pairs allowed.

    A tile cut by the sequence end is never full (FlexAttention masks its padding
    with the mask_mod too, as ``create_block_mask`` does).
    """
    q_tile, kv_tile = tile_pair(tile)
    full = counts == q_tile * kv_tile
    return (counts > 0) & ~full, full


def tile_occupancy(layout: AttentionLayout, tile: int = ATTENTION_TILE, device: Optional[torch.device] = None,
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

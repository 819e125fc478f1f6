"""FlexAttention ``BlockMask`` of a layout, counted in closed form: no dense mask, no compiled argsort.

``create_block_mask`` evaluates the mask_mod on every (query, key) pair and, when
compiled, argsorts the KV blocks inside the graph: at 2L = 16384 that compile
hits an inductor cliff (pytorch issue 182060) and the eager version holds the
``[2L, 2L]`` mask.  Here the allowed pairs of every ``q_tile x kv_tile`` tile
come in closed form from each query row's (at most two) key intervals
(:func:`llada_cpt.kernels.tiles.tile_counts`, no mask is built).  A tile is
*full* when every pair is allowed (FlexAttention skips its mask_mod), *partial*
when some are; tiles cut by the sequence end are never full, as in
``create_block_mask``.  The KV-block index lists are written by a cumulative
sum and a scatter in the order of ``create_block_mask``'s stable descending
argsort (so the BlockMask is identical, tested), then
``BlockMask.from_kv_blocks`` derives the query-side lists eagerly from the small
``[tiles, tiles]`` table.  Everything runs eagerly: nothing to compile, no
recompilation per layout.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch

from llada_cpt.diffusion.layout import AttentionLayout

from .tiles import ATTENTION_TILE, TileSize, key_intervals, tile_counts, tile_pair, tile_states

__all__ = ["ordered_blocks", "closed_form_block_mask"]


def ordered_blocks(flags: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(num_blocks [b, 1, nq], indices [b, 1, nq, nk])`` int32 of a ``[b, nq, nk]`` bool table.

    Flagged columns first in ascending order, then the others ascending: the
    order of ``argsort(flags, descending=True, stable=True)``, written by a
    cumulative sum and one scatter instead of a sort.
    """
    flags = flags.unsqueeze(1)
    num = flags.sum(-1, dtype=torch.int32)
    taken = flags.cumsum(-1, dtype=torch.int32) - 1
    rest = (~flags).cumsum(-1, dtype=torch.int32) - 1 + num.unsqueeze(-1)
    slot = torch.where(flags, taken, rest).long()
    columns = torch.arange(flags.shape[-1], device=flags.device, dtype=torch.int32).expand_as(slot)
    indices = torch.empty_like(columns).scatter_(-1, slot, columns)
    return num, indices


def closed_form_block_mask(layout: AttentionLayout, device: torch.device, mask_mod: Optional[Callable],
                           tile: TileSize = ATTENTION_TILE):
    """The ``BlockMask`` of ``layout`` (local queries x all keys), with full tiles separated.

    Equal to ``create_block_mask(mask_mod, b, None, Sq, Sk, BLOCK_SIZE=tile)``
    for a mask_mod of the layout's rule, tensor for tensor (tested).
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device(device)
    q_tile, kv_tile = tile_pair(tile)
    if layout.doc_ids.device != device:
        layout = dataclasses.replace(layout, doc_ids=layout.doc_ids.to(device))
    q_index = layout.global_index(True)
    num_keys = layout.global_index(False).numel()
    counts = tile_counts(key_intervals(layout, q_index), num_keys, (q_tile, kv_tile))
    partial, full = tile_states(counts, (q_tile, kv_tile))
    lists = {}
    for side, table in (("kv", partial), ("full_kv", full), ("q", partial.transpose(1, 2)),
                        ("full_q", full.transpose(1, 2))):
        lists[f"{side}_num_blocks"], lists[f"{side}_indices"] = ordered_blocks(table)
    lengths = (q_index.numel(), num_keys)
    try:  # the query-side lists by the same scatter (from_kv_blocks would densify and argsort them)
        return BlockMask(seq_lengths=lengths, BLOCK_SIZE=(q_tile, kv_tile), mask_mod=mask_mod, **lists)
    except TypeError:  # pragma: no cover - a torch whose constructor has other argument names
        kv = [lists[k] for k in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")]
        return BlockMask.from_kv_blocks(*kv, BLOCK_SIZE=(q_tile, kv_tile), mask_mod=mask_mod, seq_lengths=lengths)

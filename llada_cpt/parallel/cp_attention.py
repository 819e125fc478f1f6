"""Keys and values of the whole sequence for this context-parallel rank's queries.

Under CP a rank holds the queries (and keys/values) of its positions of both
halves of ``[x_t ; x_0]`` (:mod:`llada_cpt.parallel.cp_batch`).  Attention needs
those queries against *all* keys.  We all-gather the RoPE'd K/V over the CP
group in forward (an autograd function whose backward reduce-scatters, i.e.
sums, the K/V gradients back to their owners) and reorder them into global
order, so every attention backend sees exactly the (local queries, all keys)
problem that ``AttentionLayout.global_index`` / ``dense_mask(local_queries=True)``
describe - the reference, FlexAttention (block mask from the same tables),
cuDNN (bias) and TE backends need nothing CP-specific.

Why an all-gather and not a ring (TE's ``p2p`` CP):

* the block-diffusion mask is irregular; a ring would need, per step, the mask
  slice of (local queries, the visiting rank's keys) and an online-softmax
  merge of partial results, in every backend.  With all keys present every
  backend runs unchanged, and FlexAttention still skips empty tiles.
* traffic is the same: a ring also moves every other rank's K/V to every rank
  (``(cp-1)/cp`` of the full K/V per rank, each way); the all-gather just does
  it in one collective instead of ``cp-1`` overlapped steps.
* memory: the gathered K/V of one layer is ``2 * S * hkv * d`` elements
  (``S = 2L``) - with GQA ``hkv`` is small (e.g. L = 8192, 8 KV heads of 128,
  bf16: 64 MiB), versus ``b * hq * (S/cp) * S`` scores that no fused backend
  materialises anyway.  It is kept for backward per layer unless the core
  attention is recomputed (``model.recompute_granularity``); a ring would keep
  only one visiting shard, which matters at very long L and is the follow-up
  if that becomes the limit.

The key order comes from :func:`~llada_cpt.parallel.cp_batch.layout_partition`
(deterministic, no communication), cached per layout so that the layers of a
micro-batch (and activation recomputation) compute it once.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..diffusion.layout import AttentionLayout
from .cp_batch import layout_partition

__all__ = ["gather_sequence", "global_key_order", "gather_context_kv"]

_ORDER_CACHE_SIZE = 8  # micro-batches in flight (pipeline schedules) times a little slack


def _reduce_scatter(out: torch.Tensor, grad: torch.Tensor, group) -> None:
    try:
        dist.reduce_scatter_tensor(out, grad, group=group)
    except (RuntimeError, NotImplementedError):
        if dist.get_backend(group) != "gloo":
            raise
        dist.all_reduce(grad, group=group)  # some gloo builds have no reduce-scatter
        out.copy_(grad.chunk(dist.get_world_size(group))[dist.get_rank(group)])


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 in rank order; backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
        _reduce_scatter(out, grad, ctx.group)
        return out, None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` ``[s, ...]`` of every rank of ``group`` stacked in rank order ``[world * s, ...]``."""
    return _GatherSequence.apply(x, group)


class _OrderCache:
    """Key order per layout, by identity of its ``local_positions`` and ``doc_ids`` tensors.

    A weak reference proves the very same tensors are still alive, so an id
    reused by a later micro-batch's tensor is a miss, never a stale hit.
    """

    def __init__(self, size: int):
        self.size = size
        self.entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    def get(self, layout: AttentionLayout, extra: tuple, build) -> torch.Tensor:
        pos, doc = layout.local_positions, layout.doc_ids
        key = (id(pos), pos._version, id(doc), doc._version, layout.block_size, layout.mdlm, layout.causal) + extra
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is pos and hit[1]() is doc:
            self.entries.move_to_end(key)
            return hit[2]
        value = build()
        self.entries[key] = (weakref.ref(pos), weakref.ref(doc), value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


_ORDER_CACHE = _OrderCache(_ORDER_CACHE_SIZE)


def global_key_order(layout: AttentionLayout, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Permutation taking CP-gathered tokens (rank order) to global order ``[0, num_copies * L)``.

    Rank ``r`` contributes ``layout_partition(layout)[r]`` of each half, so the
    gathered token ``j`` is the global token ``G[j]``; the result is ``argsort(G)``.
    Raises if ``layout.local_positions`` is not this rank's share of that partition
    (the split and the gather must agree, or keys would be silently misplaced).
    """
    parts = [p.cpu() for p in layout_partition(layout, cp_size)]
    mine = layout.local_positions.detach().to("cpu")
    if not torch.equal(parts[cp_rank], mine):
        raise ValueError(
            f"layout.local_positions are not CP rank {cp_rank}'s positions of llada_cpt.parallel.cp_partition "
            f"for this layout; split micro-batches with llada_cpt.parallel.cp_batch.split_batch"
        )
    gathered = torch.cat([layout.with_local_positions(p).global_index(local=True).cpu() for p in parts])
    return torch.argsort(gathered)


def gather_context_kv(
    key: torch.Tensor, value: torch.Tensor, layout: AttentionLayout, group: Optional[dist.ProcessGroup]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local ``key``/``value`` ``[s_local, b, hkv, d]`` -> all tokens ``[num_copies * L, b, hkv, d]``, global order.

    A no-op without context parallelism (no group, a group of one, or a layout
    without ``local_positions``).  ``key`` must already carry its RoPE rotation
    (by its own positions), since the gathered keys are not rotated again.
    """
    if group is None or layout.local_positions is None or dist.get_world_size(group) == 1:
        return key, value
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    local = layout.global_index(local=True).numel()
    total = layout.num_copies * layout.seq_length
    if local * cp != total or key.shape[0] != local:
        raise ValueError(
            f"context parallelism over {cp} ranks needs {total // cp} local tokens per sequence, got "
            f"layout {local}, keys {key.shape[0]}; split micro-batches with llada_cpt.parallel.cp_batch.split_batch"
        )
    order = _ORDER_CACHE.get(layout, (cp, rank, str(key.device)),
                             lambda: global_key_order(layout, cp, rank).to(key.device))
    # one collective for both: K and V share every dimension but the last
    kv = gather_sequence(torch.cat([key, value.to(key.dtype)], dim=-1), group).index_select(0, order)
    return kv[..., : key.shape[-1]], kv[..., key.shape[-1]:].to(value.dtype)

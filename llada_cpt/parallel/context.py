"""Which sequence positions each context-parallel rank holds.

A CP rank holds the *same* positions in both halves of ``[x_t ; x_0]`` (in the
MDLM layout, of the single copy), so its queries of either half are local and
one all-gather of K/V gives every rank the keys it needs.  Every rank holds
``L / cp`` positions, so the gathered K/V shards have equal shapes.

Plain zig-zag (``2*cp`` equal chunks, rank ``r`` holds ``r`` and ``2cp-1-r``)
balances a single causal document, but not packed documents under the
block-diffusion mask: a position's work is ``2 * min((b+1)B, n)`` (see
``work.py``), so long documents dominate and plain zig-zag reaches ~2x at CP=8.

``cp_partition`` balances the closed-form work instead, in 64-position tiles
of the global sequence (the attention kernels' query tiles):

1. Whole tiles are dealt costliest first, each to the least loaded rank that
   still has room (LPT under equal counts).
2. Swaps of equal-size units between the most loaded rank and any other rank
   lower the maximum while they can (a swap keeps counts equal).
3. Only if ``max / mean`` still exceeds ``tolerance`` are some tiles *shared*:
   dealt position by position, taken alternately from the costliest and the
   cheapest tiles, so that single positions of very different cost can even
   out what whole tiles cannot.  The number of shared tiles grows
   geometrically (by ``cp``, ``2cp``, ...) until the tolerance is met.

Alignment property (tested): each full tile ``[64t, 64t+64)`` is held whole by
one rank, except the shared tiles.  ``n_tiles % cp`` tiles and the ``L % 64``
tail are always shared (equal counts need it; none when ``L`` is a multiple of
``64 * cp``); more are shared only when whole tiles cannot meet ``tolerance``,
i.e. when a few costly tiles stand among cheap ones, e.g. a document of a few
hundred tokens among tiny ones in the MDLM layout.  On packings of 16-3000 token
documents at L = 8192 every tile stays whole for CP 2, 4 and 8.

Everything is integer arithmetic with stable sorts, so every rank computes the
same answer from the same ``doc_ids``; one call takes a few milliseconds at
L = 8192.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .work import doc_ids_array, position_cost_numpy

__all__ = ["TILE", "cp_positions", "cp_partition", "zigzag_positions", "zigzag_partition"]

TILE = 64
"""Query tile of the attention kernels; whole tiles keep their key-tile sparsity."""

DEFAULT_TOLERANCE = 1.02
"""Target ``max / mean`` work before tiles are shared (the hard requirement is 1.05)."""

_MAX_SWAPS = 256
"""Swaps per attempt; bounds the time of pathological layouts (a few are typical)."""


def _check(seq_length: int, cp_size: int, cp_rank: int | None = None) -> None:
    if cp_size < 1:
        raise ConfigError(f"context_parallel_size must be >= 1, got {cp_size}")
    if seq_length % (2 * cp_size):
        raise ConfigError(
            f"seq_length {seq_length} is not divisible by 2 * context_parallel_size = {2 * cp_size}; "
            f"choose a seq_length that is a multiple of {2 * cp_size} or a smaller context_parallel_size"
        )
    if cp_rank is not None and not 0 <= cp_rank < cp_size:
        raise ConfigError(f"cp_rank {cp_rank} is outside [0, {cp_size})")


def zigzag_partition(seq_length: int, cp_size: int) -> list[torch.LongTensor]:
    """Plain zig-zag for all ranks: rank ``r`` holds chunks ``r`` and ``2cp-1-r`` of ``2cp``."""
    _check(seq_length, cp_size)
    c = seq_length // (2 * cp_size)
    return [
        torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * cp_size - 1 - r) * c, (2 * cp_size - r) * c)])
        for r in range(cp_size)
    ]


def zigzag_positions(seq_length: int, cp_size: int, cp_rank: int) -> torch.LongTensor:
    """Sorted positions of ``cp_rank`` under plain zig-zag (the document-blind baseline)."""
    _check(seq_length, cp_size, cp_rank)
    return zigzag_partition(seq_length, cp_size)[cp_rank]


@dataclass
class _Units:
    """Equal-size runs of positions dealt as one piece; their count is a multiple of cp."""

    starts: np.ndarray
    size: int
    cost: np.ndarray
    owner: np.ndarray


def _units(starts: np.ndarray, size: int, csum: np.ndarray) -> _Units:
    cost = csum[starts + size] - csum[starts]
    return _Units(starts, size, cost, np.zeros(len(starts), dtype=np.int64))


def _deal(g: _Units, loads: np.ndarray) -> None:
    """LPT under equal counts: costliest unit first, to the least loaded rank with room left."""
    cp = len(loads)
    room = [len(g.starts) // cp] * cp
    heap = [(int(load), r) for r, load in enumerate(loads)]
    heapq.heapify(heap)
    cost = g.cost.tolist()
    owner = g.owner
    for u in np.argsort(-g.cost, kind="stable").tolist():
        load, r = heapq.heappop(heap)
        owner[u] = r
        room[r] -= 1
        if room[r]:
            heapq.heappush(heap, (load + cost[u], r))
    np.add.at(loads, g.owner, g.cost)


def _best_swap(g: _Units, a: int, loads: np.ndarray):
    """Best swap of a unit of rank ``a`` with a same-size unit of any other rank.

    ``max(L_a - d, L_b + d)`` is convex in the cost difference ``d``, so per unit of
    ``a`` and rank ``b`` only the two costs of ``b`` around ``c_u - (L_a - L_b)/2``
    need checking (one ``searchsorted`` over keys ``rank * K + cost``).
    Returns ``(new pair maximum, u, v)`` or None.
    """
    in_a = np.flatnonzero(g.owner == a)
    other = np.flatnonzero(g.owner != a)
    if not len(in_a) or not len(other):
        return None
    cp = len(loads)
    K = int(g.cost.max()) + 1
    key = g.owner[other] * K + g.cost[other]
    order = np.argsort(key, kind="stable")
    skey = key[order]
    ranks = np.arange(cp)
    lo = np.searchsorted(skey, ranks * K)
    hi = np.searchsorted(skey, (ranks + 1) * K)
    ca = g.cost[in_a][:, None]
    gap = loads[a] - loads
    q = ranks * K + np.clip(ca - gap // 2, 0, K - 1)
    j = np.searchsorted(skey, q)
    best = None
    for cand in (j - 1, j):
        ok = (cand >= lo) & (cand < hi)
        v = other[order[np.clip(cand, 0, len(skey) - 1)]]
        d = ca - g.cost[v]
        new = np.where(ok, np.maximum(loads[a] - d, loads[None, :] + d), np.iinfo(np.int64).max)
        i = int(np.argmin(new))
        if best is None or new.flat[i] < best[0]:
            best = (int(new.flat[i]), int(in_a[i // cp]), int(v.flat[i]))
    return best


def _refine(groups: list[_Units], loads: np.ndarray) -> None:
    """Swap same-size units between the most loaded rank and another while the maximum drops."""
    for _ in range(_MAX_SWAPS):
        a = int(np.argmax(loads))
        found = None
        for g in groups:
            s = _best_swap(g, a, loads)
            if s is not None and s[0] < loads[a] and (found is None or s[0] < found[0][0]):
                found = (s, g)
        if found is None:
            return
        (_, u, v), g = found
        b = g.owner[v]
        d = g.cost[u] - g.cost[v]
        loads[a] -= d
        loads[b] += d
        g.owner[u], g.owner[v] = b, a


def _balance(cost: np.ndarray, cp: int, tile: int, tolerance: float) -> np.ndarray:
    """Owner rank of every position (see the module docstring for the method)."""
    L = len(cost)
    csum = np.concatenate([[0], np.cumsum(cost)])
    n_tiles = L // tile
    tile_starts = np.arange(n_tiles, dtype=np.int64) * tile
    by_cost = np.argsort(-(csum[tile_starts + tile] - csum[tile_starts]), kind="stable")
    # Sharing from both ends of the cost order gives the single positions a wide
    # spread of costs, which is what lets swaps of equal counts even out the work.
    ends = np.empty(n_tiles, dtype=np.int64)
    ends[0::2] = by_cost[: (n_tiles + 1) // 2]
    ends[1::2] = by_cost[::-1][: n_tiles // 2]
    mean = cost.sum() / cp

    def attempt(n_shared: int) -> tuple[float, list[_Units]]:
        shared = np.sort(tile_starts[ends[:n_shared]])
        whole = np.sort(tile_starts[ends[n_shared:]])
        singles = np.concatenate([(shared[:, None] + np.arange(tile)).reshape(-1), np.arange(n_tiles * tile, L)])
        groups = [g for g in (_units(whole, tile, csum), _units(singles, 1, csum)) if len(g.starts)]
        loads = np.zeros(cp, dtype=np.int64)
        for g in groups:
            _deal(g, loads)
        _refine(groups, loads)
        return (loads.max() / mean if mean > 0 else 1.0), groups

    n_shared, step = n_tiles % cp, cp
    best = attempt(n_shared)
    while best[0] > tolerance and n_shared < n_tiles:
        n_shared, step = min(n_tiles, n_shared + step), 2 * step
        best = min(best, attempt(n_shared), key=lambda x: x[0])
    owner = np.empty(L, dtype=np.int64)
    for g in best[1]:
        owner[(g.starts[:, None] + np.arange(g.size)).reshape(-1)] = np.repeat(g.owner, g.size)
    return owner


def cp_partition(
    doc_ids: torch.Tensor,
    block_size: int,
    cp_size: int,
    tolerance: float = DEFAULT_TOLERANCE,
    tile: int = TILE,
) -> list[torch.LongTensor]:
    """Sorted global positions in ``[0, L)`` of every CP rank, balanced for the BDLM mask.

    ``doc_ids`` is ``[L]`` (or ``[b, L]``: the micro-batch shares one split and
    its costs add up); ``block_size >= L`` means the MDLM layout.  Each rank gets
    ``L / cp`` positions.  Deterministic: all ranks compute the same list.
    """
    if tile < 1:
        raise ConfigError(f"tile must be >= 1, got {tile}")
    d = doc_ids_array(doc_ids)
    L = d.shape[1]
    _check(L, cp_size)
    if cp_size == 1:
        return [torch.arange(L, device=doc_ids.device)]
    owner = _balance(position_cost_numpy(d, block_size), cp_size, tile, tolerance)
    # A stable sort by owner lists each rank's positions in increasing order.
    order = torch.from_numpy(np.argsort(owner, kind="stable").reshape(cp_size, L // cp_size))
    return [order[r].to(doc_ids.device) for r in range(cp_size)]


def cp_positions(doc_ids: torch.Tensor, block_size: int, cp_size: int, cp_rank: int) -> torch.LongTensor:
    """Sorted global positions that ``cp_rank`` holds in each half (see ``cp_partition``)."""
    _check(doc_ids.shape[-1], cp_size, cp_rank)
    return cp_partition(doc_ids, block_size, cp_size)[cp_rank]

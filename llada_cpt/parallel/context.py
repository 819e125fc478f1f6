"""Which sequence positions each context-parallel rank holds.

A CP rank holds the *same* positions in both halves of ``[x_t ; x_0]`` (in the
MDLM layout, of the single copy), so its queries of either half are local and
one all-gather of K/V gives every rank the keys it needs.  Every rank holds
``L / cp`` positions, so the gathered K/V shards have equal shapes.

What is balanced is the kernel's real work: non-empty ``q_tile x kv_tile``
tiles (``ATTENTION_TILE`` = 128, shared with the FlexAttention BlockMask), not
allowed query-key pairs (see ``work.py``).  A split that mixes positions of
unrelated documents into one local query tile makes that tile touch the union
of their key tiles: the pair-balanced split of before (64-position pieces) cost
up to 2.2x the ideal in tiles and was worse than plain zig-zag in most cases.

``cp_partition``:

1. The unit is a run of ``q_tile`` aligned positions; with ``L`` a multiple of
   ``cp * q_tile`` each unit fills one local query tile of each half, so a
   rank's tiles are the sum of its units' CP = 1 tile counts
   (``work.unit_tile_cost``, closed form from ``doc_ids``; a micro-batch
   ``[b, L]`` adds the costs of its samples).
2. Two equal-count splits of the units are built - LPT (costliest first, to
   the least loaded rank that still has room) and balanced largest
   differencing - and each is refined by swaps between the most loaded rank and
   any other while they lower the maximum (a swap keeps counts equal); the
   better one (LPT alone once within 1.01 x the mean) is kept.  If its busiest
   rank is still above 1.05 x the mean (few units per rank), a bounded
   exhaustive search looks for a better equal-count split
   (``optimal_unit_split``).
3. Plain zig-zag is the fallback: it is taken when its busiest rank has fewer
   tiles (exact count), so the split is never worse than zig-zag.  With ``L``
   not a multiple of ``cp * q_tile`` the ``L mod (cp * q_tile)`` tail positions
   are dealt zig-zag, and both candidates are counted exactly.

Everything is integer arithmetic with stable sorts on the host, so every rank
computes the same answer from the same ``doc_ids``.

Measured (``benchmarks/results/cp_balance.md``: L 4096-32768, CP 2-16, every
WSD block size incl. MDLM, six packings from one document to tiny ones and
mixes): busiest rank / (CP = 1 tiles / cp) <= 1.04 wherever a rank holds >= 16
local query tiles; at exactly 8 (4 units per rank) the granularity of whole
tiles often forbids 1.05 - 16 of 132 such cases are above it, 14 proven
optimal among whole-tile splits; never above plain zig-zag (worst 3.5).
About 7 ms (max 12 ms) CPU per split at L = 32768, CP = 16 on one core.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError
from ..kernels.tiles import ATTENTION_TILE, TileSize, tile_pair
from .work import rank_tile_cost, unit_tile_cost

__all__ = [
    "cp_positions",
    "cp_partition",
    "optimal_unit_split",
    "unit_split_bound",
    "zigzag_positions",
    "zigzag_partition",
]

_MAX_SWAPS = 256
"""Swaps per split; bounds the time of pathological layouts (a few are typical)."""

_GOOD_ENOUGH = 1.01
"""Busiest / mean at which LPT's split is kept without trying differencing (saves a few ms)."""

SEARCH_ABOVE = 1.05
"""Busiest / mean above which the heuristics' split is improved by an exhaustive search (the goal)."""

_SEARCH_BUDGET = 1000
"""Search steps per split (a few ms): enough to find better splits of few units per rank, where it matters."""


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


def _refine(groups: list[_Units], loads: np.ndarray, floor: int = 0) -> None:
    """Swap same-size units between the most loaded rank and another while the maximum drops
    (and is above ``floor``, a lower bound: nothing to gain there)."""
    for _ in range(_MAX_SWAPS):
        if loads.max() <= floor:
            return
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


def _differencing(cost: np.ndarray, cp: int) -> np.ndarray:
    """Owner of every unit by balanced largest differencing (Karmarkar-Karp with equal counts).

    The costs sorted in decreasing order form ``n / cp`` layers of ``cp`` units,
    each a partial split with one unit per rank; the two partial splits of
    largest spread are merged, heaviest part with lightest, until one is left.
    It finds splits that LPT misses when few units per rank must even out.
    """
    order = np.argsort(-cost, kind="stable")
    heap = []
    for layer in range(len(cost) // cp):
        units = order[layer * cp:(layer + 1) * cp].tolist()
        parts = [(int(cost[u]), [u]) for u in units]  # heaviest first
        heap.append((parts[-1][0] - parts[0][0], layer, parts))
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = sorted(((x[0] + y[0], x[1] + y[1]) for x, y in zip(a, reversed(b))), key=lambda p: -p[0])
        heapq.heappush(heap, (merged[-1][0] - merged[0][0], tie, merged))
        tie += 1
    owner = np.empty(len(cost), dtype=np.int64)
    for rank, (_, units) in enumerate(heap[0][2]):
        owner[units] = rank
    return owner


def _balance_units(cost: np.ndarray, size: int, cp: int) -> tuple[_Units, np.ndarray]:
    """Equal-count split of units of ``size`` positions: the better of LPT and differencing, both refined.

    Returns the units (owners set) and the loads per rank in the units of ``cost``.
    """
    g = _Units(np.arange(len(cost)) * size, size, cost, np.zeros(len(cost), dtype=np.int64))
    if not len(cost):
        return g, np.zeros(cp, dtype=np.int64)
    scale = int(np.gcd.reduce(cost)) or 1  # in tiles, so that the lower bound is reachable
    cost = cost // scale
    bound = unit_split_bound(cost, cp)
    best = None
    for start in ("lpt", "differencing"):
        g = _Units(g.starts, size, cost, np.zeros(len(cost), dtype=np.int64))
        if start == "lpt":
            loads = np.zeros(cp, dtype=np.int64)
            _deal(g, loads)
        else:
            g.owner[:] = _differencing(cost, cp)
            loads = np.bincount(g.owner, weights=cost, minlength=cp).astype(np.int64)
        _refine([g], loads, floor=bound)
        if best is None or loads.max() < best[1].max():
            best = (g, loads)
        if best[1].max() <= bound or best[1].max() * cp <= _GOOD_ENOUGH * cost.sum():
            break  # optimal, or close enough that a second start is not worth its time
    g, loads = best
    if bound < loads.max() and loads.max() * cp > SEARCH_ABOVE * cost.sum():
        _, owner, _ = optimal_unit_split(cost, cp, int(loads.max()), _SEARCH_BUDGET)
        if owner is not None:
            g.owner[:] = owner
            loads = np.bincount(g.owner, weights=cost, minlength=cp).astype(np.int64)
    return g, loads * scale


class _OverBudget(Exception):
    pass


def unit_split_bound(cost: np.ndarray, cp: int) -> int:
    """A lower bound on the busiest rank of any equal-count split of units of costs ``cost``.

    ``ceil(total / cp)``, and pigeonhole: of the ``k cp + 1`` costliest units one
    rank holds ``k + 1``, plus ``m - k - 1`` more (``m`` units per rank).
    """
    desc = np.sort(np.asarray(cost, dtype=np.int64))[::-1]
    asc = desc[::-1]
    m = len(desc) // cp
    bound = -(-int(desc.sum()) // cp)
    for k in range(m):
        top = k * cp + 1
        bound = max(bound, int(desc[top - k - 1:top].sum() + asc[: m - k - 1].sum()))
    return bound


def _search(values: list, counts: list, m: int, cp: int, limit: int, steps: list, budget: int):
    """Value indices of ``cp`` ranks of ``m`` units each, every rank's load <= ``limit``, or None.

    Depth-first over ranks: each takes the costliest unit left (ranks are
    interchangeable) and ``m - 1`` more in non-increasing order; remainders
    that failed are memoised.  Raises ``_OverBudget`` after ``budget`` steps.
    """
    failed: set = set()
    chosen: list = []
    left = list(counts)

    def place(ranks: int) -> bool:
        if ranks == 0:
            return True
        rest = tuple(left)
        if rest in failed or sum(v * c for v, c in zip(values, rest)) > limit * ranks:
            return False
        i0 = next(i for i, c in enumerate(left) if c)
        left[i0] -= 1
        taken = [i0]

        def pick(i: int, more: int, load: int) -> bool:
            steps[0] += 1
            if steps[0] > budget:
                raise _OverBudget
            if more == 0:
                chosen.append(list(taken))
                if place(ranks - 1):
                    return True
                chosen.pop()
                return False
            for j in range(i, len(values)):
                if left[j] and load + values[j] <= limit:
                    left[j] -= 1
                    taken.append(j)
                    ok = pick(j, more - 1, load + values[j])
                    taken.pop()
                    left[j] += 1
                    if ok:
                        return True
            return False

        ok = pick(i0, m - 1, values[i0])
        left[i0] += 1
        if not ok:
            failed.add(rest)
        return ok

    return chosen if place(cp) else None


def optimal_unit_split(cost: np.ndarray, cp: int, upper: int,
                       budget: int = 1_000_000) -> Tuple[int, Optional[np.ndarray], bool]:
    """Best equal-count split of units below a busiest-rank load of ``upper``, by exhaustive search.

    Returns ``(load, owner per unit or None, proven)``: the smallest busiest
    rank found below ``upper`` (``upper`` and None if none was found) and
    whether it is the optimum.  Each step asks for a split strictly better than
    the last one found (finding one is usually quick; proving that none exists
    is what the ``budget`` of search steps bounds), down to
    :func:`unit_split_bound`.
    """
    values, counts = np.unique(np.asarray(cost, dtype=np.int64), return_counts=True)
    values, counts = values[::-1].tolist(), counts[::-1].tolist()
    m = len(cost) // cp
    steps = [0]
    best, best_load, bound = None, upper, unit_split_bound(cost, cp)
    proven = False
    try:
        while best_load > bound:
            found = _search(values, counts, m, cp, best_load - 1, steps, budget)
            if found is None:
                break
            best, best_load = found, max(sum(values[i] for i in picks) for picks in found)
        proven = True
    except _OverBudget:
        pass
    if best is None:
        return upper, None, proven
    units = {v: list(np.flatnonzero(cost == v)) for v in values}
    owner = np.empty(len(cost), dtype=np.int64)
    for rank, picks in enumerate(best):
        for i in picks:
            owner[units[values[i]].pop()] = rank
    return best_load, owner, proven


def _zigzag_owner(seq_length: int, cp: int) -> np.ndarray:
    """Rank of every position under plain zig-zag."""
    chunk = np.arange(seq_length) // (seq_length // (2 * cp))
    return np.minimum(chunk, 2 * cp - 1 - chunk)


def _parts(owner: np.ndarray, cp: int) -> list[torch.LongTensor]:
    """Sorted positions per rank (a stable sort by owner keeps each rank's positions increasing)."""
    order = torch.from_numpy(np.argsort(owner, kind="stable").reshape(cp, -1))
    return [order[r] for r in range(cp)]


def cp_partition(
    doc_ids: torch.Tensor,
    block_size: int,
    cp_size: int,
    *,
    causal: bool = False,
    tile: TileSize = ATTENTION_TILE,
    partial_weight: float = 1.0,
) -> list[torch.LongTensor]:
    """Sorted global positions in ``[0, L)`` of every CP rank, balanced in kernel tiles.

    ``doc_ids`` is ``[L]`` (or ``[b, L]``: the micro-batch shares one split and
    its costs add up); ``block_size >= L`` means the MDLM layout, ``causal`` the
    AR layout.  ``tile`` is the kernel's ``(q_tile, kv_tile)`` (or one int);
    ``partial_weight`` the cost of a partial (masked) tile relative to a full
    one.  Each rank gets ``L / cp`` positions.  Deterministic: all ranks
    compute the same list.
    """
    if doc_ids.dim() == 0:
        raise ConfigError("doc_ids must have shape [L] or [b, L]; got a scalar")
    L = doc_ids.shape[-1]
    _check(L, cp_size)
    device = doc_ids.device
    if cp_size == 1:
        return [torch.arange(L, device=device)]
    q = tile_pair(tile)[0]
    cost = unit_tile_cost(doc_ids, block_size, tile, partial_weight, causal)
    whole = (L // q) // cp_size * cp_size  # units dealt whole
    g, loads = _balance_units(cost[:whole], q, cp_size)
    owner = np.empty(L, dtype=np.int64)
    owner[: whole * q] = np.repeat(g.owner, q)
    tail = L - whole * q
    if tail:
        owner[whole * q:] = (_zigzag_owner(tail, cp_size) if tail % (2 * cp_size) == 0
                             else np.repeat(np.arange(cp_size), tail // cp_size))
    zigzag = _zigzag_owner(L, cp_size)
    if whole * q == L and L % (2 * cp_size * q) == 0:  # both exact sums of unit costs
        ours_max = int(loads.max())
        zigzag_max = int(np.bincount(zigzag[::q], weights=cost, minlength=cp_size).max())
    else:
        args = (doc_ids, block_size)
        kw = dict(tile=tile, partial_weight=partial_weight, causal=causal)
        if whole * q == L:
            ours_max = int(loads.max())
        else:
            ours_max = int(rank_tile_cost(*args, _parts(owner, cp_size), **kw).max())
        zigzag_max = int(rank_tile_cost(*args, _parts(zigzag, cp_size), **kw).max())
    if zigzag_max < ours_max:
        owner = zigzag
    return [p.to(device) for p in _parts(owner, cp_size)]


def cp_positions(doc_ids: torch.Tensor, block_size: int, cp_size: int, cp_rank: int, **kwargs) -> torch.LongTensor:
    """Sorted global positions that ``cp_rank`` holds in each half (see ``cp_partition``)."""
    _check(doc_ids.shape[-1], cp_size, cp_rank)
    return cp_partition(doc_ids, block_size, cp_size, **kwargs)[cp_rank]

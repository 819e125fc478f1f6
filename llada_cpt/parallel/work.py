"""Attention work of a context-parallel rank: kernel tiles (balanced) and query-key pairs (FLOPs).

**Tiles** are what context parallelism balances.  A tile-skipping kernel
(FlexAttention; FA4 / block-sparse later) pays per non-empty
``q_tile x kv_tile`` tile (``ATTENTION_TILE``, 128 x 128), not per allowed pair.
A CP rank holding sorted positions ``P`` runs the local rows
``[x_t[P] ; x_0[P]]`` (MDLM and causal: one copy) in query tiles of ``q_tile``
local rows against all keys in global order (``llada_cpt.kernels.tiles``).
When ``P`` is a union of ``q_tile``-aligned runs of positions and ``L / cp`` is a
multiple of ``q_tile``, each run fills exactly one local query tile of each half,
and that tile is the CP = 1 tile of the same rows: a rank's tiles are the sum of
its runs' CP = 1 tile counts (:func:`unit_tile_cost`), which makes the split an
exact number-partitioning problem.  :func:`partition_tiles` counts any split
exactly (the benchmark and the tests use it).  A full tile may be weighted
apart from a partial (masked) one (``partial_weight``, default 1: every
non-empty tile costs the same).

**Pairs** are the FLOPs (``training/flops.py``) and the cost of a dense,
non-skipping backend, for which every equal-count split costs the same.  For a
token at document-relative position ``k`` of a document of length ``n``, with
block ``b = k // B``:

* x_t query: its own block in x_t (``min((b+1)B, n) - bB`` keys) plus the
  earlier blocks in x_0 (``bB`` keys), i.e. ``min((b+1)B, n)``;
* x_0 query: blocks ``<= b`` in x_0, again ``min((b+1)B, n)``.

So one position costs ``2 * min((b+1)B, n)``; in the MDLM layout (``B >= L``,
only the x_t copy, eq. 4 mask) it costs ``n``.  This is O(L) instead of the
O(L^2) dense count.  Documents are the contiguous runs of ``doc_ids`` (as in
``diffusion.masks.document_starts``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..diffusion.inputs import is_mdlm
from ..diffusion.layout import AttentionLayout
from ..errors import ConfigError
from ..kernels.tiles import (
    ATTENTION_TILE,
    TileSize,
    key_intervals,
    layout_tile_counts,
    tile_counts,
    tile_pair,
    tile_states,
)

__all__ = [
    "TILE_COST_SCALE",
    "tile_layout",
    "unit_tile_cost",
    "rank_tile_cost",
    "partition_tiles",
    "position_cost",
    "partition_work",
    "imbalance",
    "random_document_ids",
    "PACKINGS",
    "synthetic_packing",
    "wsd_block_sizes",
]


def doc_ids_array(doc_ids: torch.Tensor) -> np.ndarray:
    """``doc_ids`` (``[L]`` or ``[b, L]``, any device) as a ``[b, L]`` host array."""
    if doc_ids.dim() == 0:
        raise ConfigError("doc_ids must have shape [L] or [b, L]; got a scalar")
    return doc_ids.detach().to("cpu").reshape(-1, doc_ids.shape[-1]).numpy()


def position_cost_numpy(doc_ids: np.ndarray, block_size: int) -> np.ndarray:
    """``position_cost`` on a ``[b, L]`` integer array, summed over ``b`` (int64 ``[L]``)."""
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}; use a positive block size")
    b, L = doc_ids.shape
    new_doc = np.ones((b, L), dtype=bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = np.broadcast_to(np.arange(L, dtype=np.int64), (b, L))
    start = np.maximum.accumulate(np.where(new_doc, idx, 0), axis=1)
    # End of each document: the next start, found by a reversed running minimum.
    next_start = np.where(new_doc, idx, L)
    nxt = np.full((b, L), L, dtype=np.int64)
    nxt[:, :-1] = next_start[:, 1:]
    end = np.minimum.accumulate(nxt[:, ::-1], axis=1)[:, ::-1]
    length = end - start
    if is_mdlm(block_size, L):
        cost = length
    else:
        k = idx - start
        cost = 2 * np.minimum((k // block_size + 1) * block_size, length)
    return cost.sum(axis=0)


TILE_COST_SCALE = 256
"""Integer cost of a full tile; a partial one costs ``round(partial_weight * TILE_COST_SCALE)``.

Integers keep the split exact and identical on every rank.
"""


def tile_layout(doc_ids: torch.Tensor, block_size: int, causal: bool = False) -> AttentionLayout:
    """The attention layout whose tiles a split of ``doc_ids`` ``[b, L]`` is costed by.

    ``block_size >= L`` is the MDLM layout; ``causal`` the AR layout (one copy,
    block size 1).
    """
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}; use a positive block size")
    L = doc_ids.shape[-1]
    return AttentionLayout(doc_ids.detach().to("cpu").reshape(-1, L), 1 if causal else block_size,
                           mdlm=not causal and is_mdlm(block_size, L), causal=causal)


def _tile_cost(counts: torch.Tensor, tile: TileSize, partial_weight: float) -> torch.Tensor:
    """Cost ``[b, nq]`` (int64, in ``1 / TILE_COST_SCALE`` tiles) of each query tile from its pair counts."""
    if partial_weight < 0:
        raise ConfigError(f"partial_weight must be >= 0, got {partial_weight}")
    partial, full = tile_states(counts, tile)
    return (full.sum(-1, dtype=torch.int64) * TILE_COST_SCALE
            + partial.sum(-1, dtype=torch.int64) * round(partial_weight * TILE_COST_SCALE))


def unit_tile_cost(doc_ids: torch.Tensor, block_size: int, tile: TileSize = ATTENTION_TILE,
                   partial_weight: float = 1.0, causal: bool = False) -> np.ndarray:
    """CP = 1 cost of every run ``[u q, (u+1) q)`` of positions (``q`` = query tile), summed over the batch.

    The run's x_t rows and x_0 rows each fill one query tile; its cost is the
    cost of both (``int64 [ceil(L / q)]``, in ``1 / TILE_COST_SCALE`` tiles).
    """
    layout = tile_layout(doc_ids, block_size, causal)
    L = layout.seq_length
    num_keys = layout.num_copies * L
    intervals = key_intervals(layout)
    if layout.num_copies == 2 and L % tile_pair(tile)[0]:  # each half starts its own query tiles
        counts = torch.cat([tile_counts(intervals[:, :L], num_keys, tile),
                            tile_counts(intervals[:, L:], num_keys, tile)], dim=1)
    else:
        counts = tile_counts(intervals, num_keys, tile)
    cost = _tile_cost(counts, tile, partial_weight).sum(0)
    return cost.view(layout.num_copies, -1).sum(0).numpy()


def rank_tile_cost(doc_ids: torch.Tensor, block_size: int, parts: Sequence[torch.Tensor],
                   tile: TileSize = ATTENTION_TILE, partial_weight: float = 1.0,
                   causal: bool = False) -> np.ndarray:
    """Exact cost of every rank (``int64 [cp]``, in ``1 / TILE_COST_SCALE`` tiles) for positions ``parts``."""
    layout = tile_layout(doc_ids, block_size, causal)
    return np.array([
        int(_tile_cost(layout_tile_counts(layout.with_local_positions(p.to("cpu").long()), tile),
                       tile, partial_weight).sum())
        for p in parts
    ], dtype=np.int64)


def partition_tiles(doc_ids: torch.Tensor, block_size: int, parts: Sequence[torch.Tensor],
                    tile: TileSize = ATTENTION_TILE, partial_weight: float = 1.0,
                    causal: bool = False) -> torch.Tensor:
    """Non-empty tiles of every rank (float64 ``[cp]``; partial tiles weighted) for positions ``parts``.

    Counted exactly: each rank's local rows ``[x_t[P] ; x_0[P]]`` in query tiles
    against all keys, as the kernel runs them (``parts = [arange(L)]`` is CP = 1).
    """
    cost = rank_tile_cost(doc_ids, block_size, parts, tile, partial_weight, causal)
    return torch.from_numpy(cost / TILE_COST_SCALE)


def position_cost(doc_ids: torch.Tensor, block_size: int) -> torch.LongTensor:
    """Allowed keys of the queries at each position ``[L]`` (x_t + x_0 query; summed over a batch).

    ``doc_ids`` is ``[L]`` or ``[b, L]``: under CP all samples of a micro-batch
    share the split, so their costs add up.
    """
    return torch.from_numpy(position_cost_numpy(doc_ids_array(doc_ids), block_size))


def partition_work(doc_ids: torch.Tensor, block_size: int, parts: Sequence[torch.Tensor]) -> torch.LongTensor:
    """Work (allowed query-key pairs) of every rank for a partition given as positions per rank."""
    cost = position_cost(doc_ids, block_size)
    return torch.stack([cost[p.to("cpu").long()].sum() for p in parts])


def imbalance(work: torch.Tensor) -> float:
    """``max / mean`` of per-rank work: the slowdown of the step against a perfect split."""
    work = work.double()
    return float(work.max() / work.mean())


def random_document_ids(
    seq_length: int, generator: torch.Generator, min_len: int = 16, max_len: int = 3000
) -> torch.LongTensor:
    """A synthetic packing: documents of ``U[min_len, max_len]`` tokens, the last one cut to fit.

    Used by the balance benchmark and tests as a stand-in for the data loader's
    packed sequences.
    """
    lengths = []
    total = 0
    while total < seq_length:
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        n = min(n, seq_length - total)
        lengths.append(n)
        total += n
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


PACKINGS = ("one", "tiny", "short", "uniform", "lognormal", "mixed")
"""Synthetic packings of the balance goal: one document ... many tiny ones, and mixes."""


def synthetic_packing(kind: str, seq_length: int, generator: torch.Generator) -> torch.LongTensor:
    """``doc_ids`` ``[L]`` of a seeded synthetic packing (documents cut to fit at the end).

    ``one``: a single document; ``tiny``: 1-16 tokens; ``short``: 1-200;
    ``uniform``: 16-3000; ``lognormal``: median 400, sigma 1.5 (a web-like mix);
    ``mixed``: long documents (L/8 - L/2) alternating with runs of 256-2048
    tokens of tiny (1-32) ones.
    """
    if kind == "one":
        return torch.zeros(seq_length, dtype=torch.long)
    if kind in ("tiny", "short", "uniform"):
        lo, hi = {"tiny": (1, 16), "short": (1, 200), "uniform": (16, 3000)}[kind]
        return random_document_ids(seq_length, generator, lo, hi)
    lengths: list[int] = []
    total = 0
    while total < seq_length:
        if kind == "lognormal":
            new = [max(1, int(torch.empty(1).log_normal_(6.0, 1.5, generator=generator)))]
        elif kind == "mixed":
            run = int(torch.randint(256, 2049, (1,), generator=generator))
            new = torch.randint(1, 33, (run // 16 + 1,), generator=generator).tolist()
            new = new[: int(np.searchsorted(np.cumsum(new), run)) + 1]
            new.append(int(torch.randint(seq_length // 8, seq_length // 2 + 1, (1,), generator=generator)))
        else:
            raise ConfigError(f"unknown packing {kind!r}; choose one of {', '.join(PACKINGS)}")
        for n in new:
            n = min(n, seq_length - total)
            if n > 0:
                lengths.append(n)
                total += n
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def wsd_block_sizes(seq_length: int) -> list[int]:
    """Block sizes a WSD schedule passes through (1, 4, 32, 64, ..., L); the balance target set."""
    sizes = [1, 4]
    b = 32
    while b <= seq_length:
        sizes.append(b)
        b *= 2
    if sizes[-1] != seq_length:
        sizes.append(seq_length)
    return [s for s in sizes if s <= seq_length]

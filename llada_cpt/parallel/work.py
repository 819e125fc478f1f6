"""Attention work of each query position, the quantity context parallelism balances.

The work of a CP rank is the number of allowed (query, key) pairs of its
queries: its positions in *both* halves of ``[x_t ; x_0]`` against all ``2L``
keys (DESIGN section 2).  For a token at document-relative position ``k`` of a
document of length ``n``, with block ``b = k // B``:

* x_t query: its own block in x_t (``min((b+1)B, n) - bB`` keys) plus the
  earlier blocks in x_0 (``bB`` keys), i.e. ``min((b+1)B, n)``;
* x_0 query: blocks ``<= b`` in x_0, again ``min((b+1)B, n)``.

So one position costs ``2 * min((b+1)B, n)``; in the MDLM layout (``B >= L``,
only the x_t copy, eq. 4 mask) it costs ``n``.  This is O(L) instead of the
O(L^2) dense count, cheap enough to run for every micro-batch.  Documents are
the contiguous runs of ``doc_ids`` (as in ``diffusion.masks.document_starts``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..diffusion.inputs import is_mdlm
from ..errors import ConfigError

__all__ = [
    "position_cost",
    "partition_work",
    "imbalance",
    "random_document_ids",
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

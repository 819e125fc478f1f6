"""Context-parallel partition: coverage, the closed-form work, balance and tile alignment."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.diffusion.masks import block_diffusion_mask, document_mask
from llada_cpt.errors import ConfigError
from llada_cpt.parallel.context import (
    TILE,
    _refine,
    _units,
    cp_partition,
    cp_positions,
    zigzag_partition,
    zigzag_positions,
)
from llada_cpt.parallel.work import (
    imbalance,
    partition_work,
    position_cost,
    random_document_ids,
    wsd_block_sizes,
)

L_BIG = 8192


def _docs(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def _packings(seq_length: int, seeds: range) -> list[torch.Tensor]:
    out = [torch.zeros(seq_length, dtype=torch.long)]  # one document
    for s in seeds:
        out.append(random_document_ids(seq_length, torch.Generator().manual_seed(s)))
    return out


def _shared_tiles(parts: list[torch.Tensor], seq_length: int) -> int:
    """Number of full 64-tiles that no single rank holds whole."""
    owner = torch.empty(seq_length, dtype=torch.long)
    for r, p in enumerate(parts):
        owner[p] = r
    tiles = owner[: seq_length // TILE * TILE].view(-1, TILE)
    return int((tiles != tiles[:, :1]).any(dim=1).sum())


def _dense_counts(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Allowed keys per position from the dense masks: x_t row + x_0 row (or the one MDLM row)."""
    L = doc_ids.shape[-1]
    if block_size >= L:
        return document_mask(doc_ids).sum(-1)
    rows = block_diffusion_mask(doc_ids, block_size).sum(-1)
    return rows[..., :L] + rows[..., L:]


# -- the closed-form work ---------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_position_cost_equals_dense_mask_counts(seed):
    g = torch.Generator().manual_seed(seed)
    L = int(torch.randint(8, 49, (1,), generator=g))
    doc_ids = torch.cumsum((torch.rand(L, generator=g) < 0.15).long(), 0)
    for block_size in (1, 2, 3, 4, 5, 8, L - 1, L, 2 * L):
        assert torch.equal(position_cost(doc_ids, block_size), _dense_counts(doc_ids, block_size)), block_size


def test_position_cost_of_a_batch_is_the_sum_of_its_rows():
    g = torch.Generator().manual_seed(7)
    batch = torch.stack([random_document_ids(64, g, 1, 20) for _ in range(3)])
    for block_size in (1, 4, 64):
        assert torch.equal(position_cost(batch, block_size), _dense_counts(batch, block_size).sum(0))


@pytest.mark.parametrize("block_size", [1, 4, 16, 96])
def test_partition_work_is_the_ranks_allowed_pairs(block_size):
    """Work of a rank = allowed (local query, any key) pairs of the attention layout it runs."""
    g = torch.Generator().manual_seed(block_size)
    L = 96
    doc_ids = random_document_ids(L, g, 1, 40)
    parts = cp_partition(doc_ids, block_size, 4)
    work = partition_work(doc_ids, block_size, parts)
    for r, p in enumerate(parts):
        layout = AttentionLayout(doc_ids[None], block_size, mdlm=block_size >= L, local_positions=p)
        assert int(layout.dense_mask(local_queries=True).sum()) == int(work[r])
    assert int(work.sum()) == int(_dense_counts(doc_ids, block_size).sum())


# -- partition structure ----------------------------------------------------


def test_zigzag_matches_chunk_definition():
    L, cp = 48, 3
    chunks = torch.arange(L).chunk(2 * cp)
    for r in range(cp):
        expected = torch.cat([chunks[r], chunks[2 * cp - 1 - r]])
        assert torch.equal(zigzag_positions(L, cp, r), expected)
        assert torch.equal(zigzag_partition(L, cp)[r], expected)


@pytest.mark.parametrize(
    "L, cp, block_size",
    [(16, 8, 1), (48, 3, 4), (96, 2, 96), (200, 4, 8), (8160, 6, 32), (8160, 4, 8160), (8192, 8, 1), (8192, 1, 4)],
)
def test_every_position_held_once_sorted_equal_counts(L, cp, block_size):
    doc_ids = random_document_ids(L, torch.Generator().manual_seed(L + cp), 1, max(2, L // 3))
    parts = cp_partition(doc_ids, block_size, cp)
    assert len(parts) == cp
    for r, p in enumerate(parts):
        assert p.dtype == torch.long and p.numel() == L // cp
        assert bool((p[1:] > p[:-1]).all())
        assert torch.equal(cp_positions(doc_ids, block_size, cp, r), p)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(L))
    assert all(torch.equal(a, b) for a, b in zip(parts, cp_partition(doc_ids, block_size, cp)))


def test_indivisible_sequence_and_bad_rank_raise_clear_errors():
    with pytest.raises(ConfigError, match="not divisible by 2 \\* context_parallel_size = 8"):
        cp_partition(torch.zeros(100, dtype=torch.long), 4, 4)
    with pytest.raises(ConfigError, match="not divisible"):
        zigzag_positions(50, 2, 0)
    with pytest.raises(ConfigError, match="cp_rank 4 is outside"):
        cp_positions(torch.zeros(64, dtype=torch.long), 4, 4, 4)
    with pytest.raises(ConfigError, match="context_parallel_size must be >= 1"):
        cp_partition(torch.zeros(64, dtype=torch.long), 4, 0)


@pytest.mark.parametrize("seed", range(4))
def test_swap_refinement_ends_where_no_single_swap_lowers_the_maximum(seed):
    rng = np.random.default_rng(seed)
    cp, per_rank = 3, 5
    cost = rng.integers(1, 1000, cp * per_rank)
    csum = np.concatenate([[0], np.cumsum(cost)])
    g = _units(np.arange(cp * per_rank), 1, csum)
    g.owner[:] = np.repeat(np.arange(cp), per_rank)  # a deliberately poor start
    loads = np.bincount(g.owner, weights=g.cost, minlength=cp).astype(np.int64)
    before = loads.max()
    _refine([g], loads)
    assert np.array_equal(loads, np.bincount(g.owner, weights=g.cost, minlength=cp).astype(np.int64))
    assert np.array_equal(np.bincount(g.owner, minlength=cp), [per_rank] * cp)
    assert loads.max() <= before
    a = int(np.argmax(loads))
    for u in np.flatnonzero(g.owner == a):
        for v in np.flatnonzero(g.owner != a):
            d = g.cost[u] - g.cost[v]
            assert max(loads[a] - d, loads[g.owner[v]] + d) >= loads[a]


# -- balance and alignment at L = 8192 --------------------------------------


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_balance_bound_and_whole_tiles_on_random_packings(cp):
    for doc_ids in _packings(L_BIG, range(6)):
        for block_size in wsd_block_sizes(L_BIG):
            parts = cp_partition(doc_ids, block_size, cp)
            ratio = imbalance(partition_work(doc_ids, block_size, parts))
            assert ratio <= 1.05, (cp, block_size, ratio)
            # L is a multiple of 64 * cp: equal counts need no shared tile, and
            # whole tiles balance these packings, so every tile stays whole.
            assert _shared_tiles(parts, L_BIG) == 0, (cp, block_size)


def test_plain_zigzag_fails_the_bound_that_the_partition_meets():
    """The balance test has teeth: the document-blind split is far off on the same data."""
    doc_ids = random_document_ids(L_BIG, torch.Generator().manual_seed(0))
    assert imbalance(partition_work(doc_ids, L_BIG, zigzag_partition(L_BIG, 8))) > 1.3


def test_costly_short_document_among_tiny_ones_shares_few_tiles():
    """A 100-token document among single tokens (MDLM): whole tiles cannot balance it."""
    doc_ids = _docs([100] + [1] * (L_BIG - 100))
    cp = 8
    unshared = cp_partition(doc_ids, L_BIG, cp, tolerance=float("inf"))
    assert _shared_tiles(unshared, L_BIG) == 0
    assert imbalance(partition_work(doc_ids, L_BIG, unshared)) > 1.05
    parts = cp_partition(doc_ids, L_BIG, cp)
    assert imbalance(partition_work(doc_ids, L_BIG, parts)) <= 1.05
    shared = _shared_tiles(parts, L_BIG)
    assert 0 < shared <= L_BIG // TILE // 4 and shared % cp == 0


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_only_the_remainder_tiles_are_shared_when_length_is_not_tile_aligned(cp):
    """L = 8160 has 127 full tiles and a 32-token tail: 127 % cp tiles must be shared."""
    L = 8160
    for doc_ids in _packings(L, range(2)):
        for block_size in (1, 32, L):
            parts = cp_partition(doc_ids, block_size, cp)
            assert imbalance(partition_work(doc_ids, block_size, parts)) <= 1.05
            assert _shared_tiles(parts, L) == (L // TILE) % cp

"""Context-parallel partition: the tile counter, coverage, and balance in kernel tiles.

The objective is the kernel's real work: non-empty ``q_tile x kv_tile`` tiles of
each rank's local rows against all keys.  The counter is checked against dense
masks; the split against the goal (busiest rank / (CP = 1 tiles / cp) <= 1.05
where a rank holds >= 8 local query tiles, unless no split of whole tiles can
reach it) and against plain zig-zag; and it must be the same on every rank.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_script
from dist import run_distributed
from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.diffusion.masks import block_diffusion_mask, document_mask
from llada_cpt.errors import ConfigError
from llada_cpt.kernels.tiles import ATTENTION_TILE, key_intervals, layout_tile_counts, tile_states
from llada_cpt.parallel.context import (
    _refine,
    _Units,
    cp_partition,
    cp_positions,
    optimal_unit_split,
    unit_split_bound,
    zigzag_partition,
    zigzag_positions,
)
from llada_cpt.parallel.work import (
    PACKINGS,
    partition_tiles,
    partition_work,
    position_cost,
    random_document_ids,
    synthetic_packing,
    unit_tile_cost,
    wsd_block_sizes,
)

bench = load_script("benchmarks/cp_balance.py")


def _packing(kind: str, seq_length: int, seed: int = 0) -> torch.Tensor:
    return synthetic_packing(kind, seq_length, torch.Generator().manual_seed(seed))


def _ratio(doc_ids: torch.Tensor, block_size: int, parts) -> float:
    """Busiest rank's tiles / (CP = 1 tiles / cp): the goal's measure."""
    L = doc_ids.shape[-1]
    ideal = float(partition_tiles(doc_ids, block_size, [torch.arange(L)])[0]) / len(parts)
    return float(partition_tiles(doc_ids, block_size, parts).max()) / ideal


# -- the closed-form counts --------------------------------------------------


def _dense_counts(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Allowed keys per position from the dense masks: x_t row + x_0 row (or the one MDLM row)."""
    L = doc_ids.shape[-1]
    if block_size >= L:
        return document_mask(doc_ids).sum(-1)
    rows = block_diffusion_mask(doc_ids, block_size).sum(-1)
    return rows[..., :L] + rows[..., L:]


def _dense_tile_counts(layout: AttentionLayout, q_tile: int, kv_tile: int) -> torch.Tensor:
    """Allowed pairs per tile of ``layout.dense_mask()`` (local queries), the brute-force reference."""
    mask = layout.dense_mask()[:, 0].long()
    b, sq, sk = mask.shape
    nq, nk = -(-sq // q_tile), -(-sk // kv_tile)
    padded = torch.zeros(b, nq * q_tile, nk * kv_tile, dtype=torch.long)
    padded[:, :sq, :sk] = mask
    return padded.view(b, nq, q_tile, nk, kv_tile).sum(dim=(2, 4))


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
    """Pairs (the FLOPs, reported for information) of a rank = allowed pairs of the layout it runs."""
    g = torch.Generator().manual_seed(block_size)
    L = 96
    doc_ids = random_document_ids(L, g, 1, 40)
    parts = cp_partition(doc_ids, block_size, 4, tile=8)
    work = partition_work(doc_ids, block_size, parts)
    for r, p in enumerate(parts):
        layout = AttentionLayout(doc_ids[None], block_size, mdlm=block_size >= L, local_positions=p)
        assert int(layout.dense_mask(local_queries=True).sum()) == int(work[r])
    assert int(work.sum()) == int(_dense_counts(doc_ids, block_size).sum())


@pytest.mark.parametrize("seed", range(4))
def test_tile_counts_equal_the_dense_mask_tiles(seed):
    """Closed-form pairs per tile = the dense mask's, for every layout kind, local rows and tile shape."""
    g = torch.Generator().manual_seed(seed)
    L = 4 * int(torch.randint(3, 40, (1,), generator=g))
    doc_ids = torch.stack([random_document_ids(L, g, 1, max(2, L // (seed + 2))) for _ in range(2)])
    local = torch.randperm(L, generator=g)[: L // 4].sort().values
    for block_size in (1, 3, 4, 16, L):
        for kind in ("bdlm", "mdlm", "causal"):
            layout = AttentionLayout(doc_ids, block_size, mdlm=kind == "mdlm", causal=kind == "causal")
            mask = layout.dense_mask()[:, 0]
            lo_hi = key_intervals(layout)
            keys = torch.arange(mask.shape[-1])
            in_one = (keys >= lo_hi[..., 0:1]) & (keys < lo_hi[..., 1:2])
            in_two = (keys >= lo_hi[..., 2:3]) & (keys < lo_hi[..., 3:4])
            assert torch.equal(in_one | in_two, mask) and not (in_one & in_two).any(), (block_size, kind)
            for lay in (layout, layout.with_local_positions(local)):
                for q_tile, kv_tile in ((16, 16), (32, 32), (16, 8), (5, 7)):
                    got = layout_tile_counts(lay, (q_tile, kv_tile))
                    want = _dense_tile_counts(lay, q_tile, kv_tile)
                    assert torch.equal(got.long(), want), (block_size, kind, q_tile, kv_tile)
                    partial, full = tile_states(got, (q_tile, kv_tile))
                    assert torch.equal(full, want == q_tile * kv_tile)
                    assert torch.equal(partial, (want > 0) & (want < q_tile * kv_tile))


@pytest.mark.parametrize("block_size", [1, 4, 32, 256])
def test_partition_tiles_count_each_ranks_kernel_tiles(block_size):
    """A rank's tiles = non-empty tiles of its local rows [x_t[P]; x_0[P]] against all keys (dense check)."""
    L, tile = 256, 16
    doc_ids = torch.stack([_packing("short", L, 3), _packing("uniform", L, 4)])
    for parts in (cp_partition(doc_ids, block_size, 4, tile=tile), zigzag_partition(L, 4)):
        for weight in (1.0, 0.0, 2.5):
            tiles = partition_tiles(doc_ids, block_size, parts, tile=tile, partial_weight=weight)
            for r, p in enumerate(parts):
                lay = AttentionLayout(doc_ids, block_size, mdlm=block_size >= L, local_positions=p)
                counts = _dense_tile_counts(lay, tile, tile)
                full = int((counts == tile * tile).sum())
                partial = int(((counts > 0) & (counts < tile * tile)).sum())
                assert float(tiles[r]) == pytest.approx(full + weight * partial), (r, weight)


@pytest.mark.parametrize("kind", ["short", "mixed"])
def test_aligned_units_add_up_to_each_ranks_tiles(kind):
    """With L a multiple of cp * q_tile, a rank's exact tiles = the sum of its units' CP = 1 tiles."""
    L, cp, tile = 1024, 4, 32
    doc_ids = torch.stack([_packing(kind, L, 1), _packing(kind, L, 2)])
    for block_size in (1, 8, 64, L):
        cost = unit_tile_cost(doc_ids, block_size, tile)
        one = partition_tiles(doc_ids, block_size, [torch.arange(L)], tile=tile)
        assert cost.sum() / 256 == pytest.approx(float(one[0]))
        for parts in (cp_partition(doc_ids, block_size, cp, tile=tile), zigzag_partition(L, cp)):
            tiles = partition_tiles(doc_ids, block_size, parts, tile=tile)
            for r, p in enumerate(parts):
                units = torch.unique(p // tile).numpy()
                assert float(tiles[r]) == pytest.approx(cost[units].sum() / 256)


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
    [(16, 8, 1), (48, 3, 4), (96, 2, 96), (200, 4, 8), (8160, 6, 32), (8160, 4, 8160), (8192, 8, 1), (8192, 1, 4),
     (12288, 6, 64)],
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


def test_ranks_hold_whole_aligned_tiles():
    """L a multiple of cp * 128: every 128-position tile is held whole by one rank."""
    doc_ids = _packing("lognormal", 8192)
    for block_size in (1, 32, 8192):
        parts = cp_partition(doc_ids, block_size, 8)
        owner = torch.empty(8192, dtype=torch.long)
        for r, p in enumerate(parts):
            owner[p] = r
        tiles = owner.view(-1, ATTENTION_TILE)
        assert bool((tiles == tiles[:, :1]).all())


def test_indivisible_sequence_and_bad_arguments_raise_clear_errors():
    with pytest.raises(ConfigError, match="not divisible by 2 \\* context_parallel_size = 8"):
        cp_partition(torch.zeros(100, dtype=torch.long), 4, 4)
    with pytest.raises(ConfigError, match="not divisible"):
        zigzag_positions(50, 2, 0)
    with pytest.raises(ConfigError, match="cp_rank 4 is outside"):
        cp_positions(torch.zeros(64, dtype=torch.long), 4, 4, 4)
    with pytest.raises(ConfigError, match="context_parallel_size must be >= 1"):
        cp_partition(torch.zeros(64, dtype=torch.long), 4, 0)
    with pytest.raises(ConfigError, match="partial_weight must be >= 0"):
        cp_partition(torch.zeros(64, dtype=torch.long), 4, 2, partial_weight=-1.0)


@pytest.mark.parametrize("seed", range(4))
def test_swap_refinement_ends_where_no_single_swap_lowers_the_maximum(seed):
    rng = np.random.default_rng(seed)
    cp, per_rank = 3, 5
    cost = rng.integers(1, 1000, cp * per_rank)
    g = _Units(np.arange(cp * per_rank), 1, cost, np.repeat(np.arange(cp), per_rank))  # a deliberately poor start
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


# -- balance in tiles --------------------------------------------------------


def _goal_holds(doc_ids, block_size, cp) -> tuple[float, float, bool]:
    """(ours, zig-zag, ours within 0.02 of the goal or of the best split of whole units, if proven)."""
    L = doc_ids.shape[-1]
    ours = _ratio(doc_ids, block_size, cp_partition(doc_ids, block_size, cp))
    plain = _ratio(doc_ids, block_size, zigzag_partition(L, cp))
    if ours <= bench.GOAL:
        return ours, plain, True
    cost = unit_tile_cost(doc_ids, block_size)
    load, _, proven = optimal_unit_split(cost, cp, int(round(ours * cost.sum() / cp)))
    best = load / (cost.sum() / cp) if proven else bench.GOAL
    return ours, plain, ours <= max(bench.GOAL, best) + 0.02


@pytest.mark.parametrize("L, cps", [(4096, (8,)), (8192, (8, 16)), (16384, (16,))])
def test_tile_balance_goal_on_every_packing_and_block_size(L, cps):
    """<= 1.05 where a rank holds >= 16 local query tiles; at exactly 4 units (8 tiles) per rank, where
    whole tiles often cannot reach 1.05, within 0.02 of 1.05 or of the proven best split of whole tiles.
    Never above plain zig-zag.  Every WSD block size including MDLM (the wide sweep is the benchmark)."""
    for kind in PACKINGS:
        doc_ids = _packing(kind, L, 5)
        for block_size in wsd_block_sizes(L):
            for cp in cps:
                ours, plain, ok = _goal_holds(doc_ids, block_size, cp)
                assert ours <= plain + 1e-9, (kind, block_size, cp, ours, plain)
                tiles = bench.local_query_tiles(L, cp, block_size)
                if tiles >= 2 * bench.GOAL_MIN_LOCAL_TILES:
                    assert ours <= bench.GOAL, (kind, block_size, cp, ours)
                elif tiles >= bench.GOAL_MIN_LOCAL_TILES:
                    assert ok, (kind, block_size, cp, ours)


def test_zigzag_misses_the_goal_that_the_split_meets():
    """The goal has teeth: lognormal documents, block 32, CP = 8 (the issue's measured case)."""
    doc_ids = _packing("lognormal", 16384, 1)
    assert _ratio(doc_ids, 32, zigzag_partition(16384, 8)) > 1.3
    assert _ratio(doc_ids, 32, cp_partition(doc_ids, 32, 8)) <= 1.02


def test_a_micro_batch_is_balanced_on_the_sum_of_its_samples():
    L, cp = 8192, 8
    batch = torch.stack([_packing(kind, L, 2) for kind in ("one", "short", "mixed", "lognormal")])
    for block_size in (32, L):
        parts = cp_partition(batch, block_size, cp)
        assert _ratio(batch, block_size, parts) <= 1.02
        assert unit_tile_cost(batch, block_size).tolist() == sum(
            unit_tile_cost(row, block_size) for row in batch).tolist()


@pytest.mark.parametrize("L, cp", [(4096, 16), (2048, 16), (1024, 4), (8160, 4), (384, 2)])
def test_few_or_cut_tiles_never_worse_than_zigzag(L, cp):
    """< 8 local tiles, or L not a multiple of cp * 128: exact comparison keeps zig-zag as the floor."""
    for kind in ("one", "tiny", "uniform", "mixed"):
        doc_ids = _packing(kind, L, 7)
        for block_size in (1, 32, L):
            parts = cp_partition(doc_ids, block_size, cp)
            assert torch.equal(torch.cat(parts).sort().values, torch.arange(L))
            assert _ratio(doc_ids, block_size, parts) <= _ratio(doc_ids, block_size, zigzag_partition(L, cp)) + 1e-9


def _groupings(units: tuple, size: int):
    """Every split of ``units`` into groups of ``size`` (as lists of groups)."""
    if not units:
        yield []
        return
    import itertools

    first, rest = units[0], units[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = tuple(u for u in rest if u not in others)
        for tail in _groupings(remaining, size):
            yield [(first,) + others] + tail


def test_exhaustive_search_finds_the_true_optimum():
    """Brute force over every equal-count split of 8 units on 2 and 4 ranks."""
    rng = np.random.default_rng(3)
    for cp in (2, 4):
        cost = rng.integers(1, 50, 8)
        best = min(max(int(cost[list(g)].sum()) for g in split) for split in _groupings(tuple(range(8)), 8 // cp))
        assert best >= unit_split_bound(cost, cp)
        value, owner, proven = optimal_unit_split(cost, cp, int(cost.sum()) + 1)
        assert value == best and proven
        assert np.array_equal(np.bincount(owner, minlength=cp), [8 // cp] * cp)
        assert np.bincount(owner, weights=cost, minlength=cp).max() == best
        assert optimal_unit_split(cost, cp, best) == (best, None, True)  # nothing below the optimum


# -- the same split on every rank ---------------------------------------------


def _split_on_rank(rank: int, world: int) -> list[bool]:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1 + rank)  # ranks differ in threads, as hosts do
    out = []
    doc_ids = _packing("mixed", 8192, 9)
    for block_size in (4, 8192):
        parts = cp_partition(torch.stack([doc_ids, doc_ids.flip(0)]), block_size, 8)
        mine = torch.cat(parts)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        out.append(all(torch.equal(g, mine) for g in gathered))
    return out


def test_every_rank_computes_the_same_split():
    results = run_distributed(_split_on_rank, 2, timeout=120)
    assert results == [[True, True]] * 2

"""Noise process, loss weights and the [x_t ; x_0] input builder."""
import dataclasses
import math

import pytest
import torch

from conftest import random_doc_ids
from llada_cpt.diffusion.inputs import DiffusionBatch, build_diffusion_batch, noised_half
from llada_cpt.diffusion.loss import elbo_weights, normalised_loss, weighted_loss_terms
from llada_cpt.diffusion.masks import block_index, document_positions
from llada_cpt.diffusion.noise import NoiseConfig, complementary_mask, sample_mask, sample_timesteps

MASK = 99


def test_band_respected_per_sequence_and_per_block(gen):
    doc = torch.stack([random_doc_ids(64, gen) for _ in range(8)])
    for per_block in (False, True):
        cfg = NoiseConfig(0.3, 0.6, per_block=per_block)
        t = sample_timesteps(doc, 8, cfg, gen)
        assert t.min() >= 0.3 and t.max() <= 0.6
        blk = block_index(doc, 8)
        for r in range(8):
            keys = set(zip(doc[r].tolist(), blk[r].tolist()))
            distinct = {float(v) for v in t[r]}
            if per_block:  # one value per (document, block), different blocks differ almost surely
                assert len(distinct) == len(keys)
            else:
                assert len(distinct) == 1


def test_mask_rate_and_eligibility(gen):
    t = torch.full((4, 4000), 0.3)
    eligible = torch.rand(4, 4000, generator=gen) < 0.5
    m = sample_mask(t, eligible, gen)
    assert not (m & ~eligible).any()
    rate = m.sum() / eligible.sum()
    assert abs(float(rate) - 0.3) < 0.02
    c = complementary_mask(m, eligible)
    assert torch.equal(c ^ m, eligible) and not (c & m).any()


def test_band_validation():
    with pytest.raises(ValueError, match="mask ratio band"):
        NoiseConfig(0.8, 0.2)


def test_bdlm_batch_layout(gen):
    x0 = torch.randint(0, 50, (2, 16), generator=gen)
    doc = torch.stack([random_doc_ids(16, gen) for _ in range(2)])
    batch = build_diffusion_batch(x0, doc, 4, MASK, NoiseConfig(0.5, 0.5), generator=gen)
    assert batch.input_ids.shape == (2, 32) and not batch.layout.mdlm
    xt, clean = batch.input_ids[:, :16], batch.input_ids[:, 16:]
    assert torch.equal(clean, x0)
    assert torch.equal(xt == MASK, batch.masked)
    assert torch.equal(torch.where(batch.masked, x0, xt), x0)
    assert torch.equal(batch.labels, torch.cat([x0, x0], 1))
    w = batch.loss_weight
    assert torch.all(w[:, 16:] == 0)
    assert torch.allclose(w[:, :16], batch.masked.float() / 0.5)
    assert torch.equal(batch.position_ids, document_positions(doc).repeat(1, 2))
    assert int(batch.num_eligible) == 32


def test_mdlm_drops_clean_half(gen):
    x0 = torch.randint(0, 50, (2, 16), generator=gen)
    doc = torch.zeros(2, 16, dtype=torch.long)
    for B in (16, 64):
        batch = build_diffusion_batch(x0, doc, B, MASK, generator=torch.Generator().manual_seed(1))
        assert batch.layout.mdlm and batch.input_ids.shape == (2, 16)
        assert torch.equal(batch.labels, x0)


def test_block_must_divide_length(gen):
    x0 = torch.zeros(1, 12, dtype=torch.long)
    with pytest.raises(ValueError, match="does not divide"):
        build_diffusion_batch(x0, torch.zeros_like(x0), 5, MASK)


def test_complementary_pairs_cover_each_eligible_token_once(gen):
    x0 = torch.randint(0, 50, (3, 24), generator=gen)
    doc = torch.zeros_like(x0)
    eligible = torch.zeros_like(x0, dtype=torch.bool)
    eligible[:, 8:] = True  # prompt = first 8 tokens
    batch = build_diffusion_batch(x0, doc, 8, MASK, eligible=eligible, generator=gen, complementary=True)
    m = batch.masked
    assert m.shape == (6, 24)
    assert torch.equal(m[:3] ^ m[3:], eligible) and not (m[:3] & m[3:]).any()
    assert not batch.loss_weight[:, :8].any() and not batch.loss_weight[:, 24:].any()


def test_weighted_terms_and_normalisation_independent_of_split(gen):
    ce = torch.rand(8, 10, generator=gen)
    masked = torch.rand(8, 10, generator=gen) < 0.4
    t = torch.rand(8, 1, generator=gen).clamp(min=0.1).expand(8, 10)
    w = elbo_weights(masked, t)
    assert torch.allclose(w[masked], 1 / t[masked]) and torch.all(w[~masked] == 0)
    whole = normalised_loss(*weighted_loss_terms(ce, w, 80))
    parts = [weighted_loss_terms(ce[i:i + 2], w[i:i + 2], 20) for i in range(0, 8, 2)]
    split = normalised_loss(sum(p[0] for p in parts), sum(p[1] for p in parts))
    assert torch.allclose(whole, split)
    expected = sum(ce[i, j] / t[i, j] for i in range(8) for j in range(10) if masked[i, j]) / 80
    assert math.isclose(float(whole), float(expected), rel_tol=1e-5)
    assert float(normalised_loss(torch.tensor(0.0), torch.tensor(0.0))) == 0.0


@dataclasses.dataclass
class _WithIndex(DiffusionBatch):
    index: torch.Tensor = None


def test_noised_half_keeps_the_x_t_half_of_per_token_fields(gen):
    """The loss's view: [b, S] fields cut to the first half (also under a CP split), [b, L] ones and MDLM kept."""
    from llada_cpt.parallel.cp_batch import split_batch

    doc = torch.stack([random_doc_ids(16, gen), random_doc_ids(16, gen)])
    x0 = torch.randint(0, 50, (2, 16), generator=gen)
    batch = build_diffusion_batch(x0, doc, 4, 99, generator=gen)
    for b in (batch, split_batch(batch, 2, 1)):
        # a per-position [b, L] field of a subclass: under CP=2 the local input is as long as L, and kept
        b = _WithIndex(**{f.name: getattr(b, f.name) for f in dataclasses.fields(b)}, index=doc.clone())
        half = noised_half(b)
        assert half.index is b.index
        S = b.input_ids.shape[1]
        for name in ("input_ids", "labels", "loss_weight"):
            assert torch.equal(getattr(half, name), getattr(b, name)[:, :S // 2]), name
        for name in ("masked", "t", "eligible"):
            assert getattr(half, name) is getattr(b, name)
        assert half.layout is b.layout
        assert float((half.loss_weight).sum()) == float(b.loss_weight.sum())  # no weight on the x_0 half
    mdlm = build_diffusion_batch(x0, doc, 16, 99, generator=gen)
    assert noised_half(mdlm) is mdlm


def _weight_ratio(weight: torch.Tensor, eligible: torch.Tensor, groups: torch.Tensor):
    """Per (row, group) ``sum w / #eligible`` for groups with eligible tokens: mean and standard error."""
    ratios = []
    for g in groups.unique().tolist():
        sel = groups == g
        n = (eligible & sel).sum(1)
        keep = n > 0
        ratios.append(((weight * sel).sum(1)[keep] / n[keep]))
    r = torch.cat(ratios).double()
    return float(r.mean()), float(r.std() / math.sqrt(r.numel()))


@pytest.mark.parametrize("per_block", [False, True])
def test_expected_elbo_weight_per_eligible_token_is_one_per_sequence_and_per_block(per_block):
    """The 1/t weight makes E[sum w] = #eligible for every sequence and every block, over many seeds."""
    L, B, rows = 64, 16, 1000
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        doc = torch.stack([random_doc_ids(L, g) for _ in range(rows)])
        eligible = torch.rand(rows, L, generator=g) < 0.8
        batch = build_diffusion_batch(torch.zeros_like(doc), doc, B, MASK, NoiseConfig(0.1, 0.9, per_block),
                                      eligible=eligible, generator=g)
        w = batch.loss_weight[:, :L]
        for groups in (torch.zeros_like(doc), block_index(doc, B) + 1000 * doc):  # per sequence, per block
            mean, err = _weight_ratio(w, eligible, groups)
            assert abs(mean - 1.0) < 5 * err + 1e-3, (seed, mean, err)


def test_complementary_rows_are_weighted_by_their_own_ratio_with_an_asymmetric_band():
    """Band [0.3, 0.8]: the complement's ratio 1 - t lies in [0.2, 0.7]; both rows keep E[sum w]/eligible = 1,
    also when t > 0.7 (where clamping the complement's ratio to the band under-weighted it: 0.835)."""
    L, rows = 64, 2000
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x0 = torch.zeros(rows, L, dtype=torch.long)
        doc = torch.zeros_like(x0)
        eligible = torch.ones_like(x0, dtype=torch.bool)
        eligible[:, :8] = False
        batch = build_diffusion_batch(x0, doc, 16, MASK, NoiseConfig(0.3, 0.8), eligible=eligible, generator=g,
                                      complementary=True)
        w, t = batch.loss_weight[:, :L], batch.t[:, 0]
        n = eligible.sum(1).double()
        for name, sel in (("sample", slice(0, rows)), ("complement", slice(rows, 2 * rows))):
            r = w[sel].sum(1).double() / n
            for part in (torch.ones(rows, dtype=torch.bool), t[:rows] > 0.7):
                mean, err = float(r[part].mean()), float(r[part].std() / math.sqrt(int(part.sum())))
                assert abs(mean - 1.0) < 5 * err, (seed, name, mean, err)
        assert torch.allclose(t[rows:], 1 - t[:rows])  # each row carries its true mask ratio

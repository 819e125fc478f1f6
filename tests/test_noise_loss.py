"""Noise process, loss weights and the [x_t ; x_0] input builder."""
import dataclasses
import math

import pytest
import torch

from llada_cpt.diffusion.inputs import DiffusionBatch, build_diffusion_batch, noised_half
from llada_cpt.diffusion.loss import elbo_weights, normalised_loss, weighted_loss_terms
from llada_cpt.diffusion.masks import block_index, document_positions
from llada_cpt.diffusion.noise import NoiseConfig, complementary_mask, sample_mask, sample_timesteps
from conftest import random_doc_ids

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

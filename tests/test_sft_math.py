"""SFT math: complementary masks and mask-ratio band on packed SFT data, CAP confidence loss."""
import math

import pytest
import torch
import torch.distributed as dist

from dist import run_distributed
from llada_cpt.data.sft import Sample, collate_packed, pack_groups
from llada_cpt.diffusion.cap import (
    cap_confidence_terms,
    cap_loss,
    token_entropy,
    vocab_parallel_cap_confidence_terms,
)
from llada_cpt.diffusion.inputs import build_diffusion_batch
from llada_cpt.diffusion.loss import weighted_loss_terms
from llada_cpt.diffusion.masks import block_index
from llada_cpt.diffusion.noise import NoiseConfig

MASK, EOD, PAD, B, L = 99, 98, 97, 4, 32


def sft_batch(gen, n_samples=12):
    """Packed SFT sequences of random prompt/response samples (prompt never eligible)."""
    samples = []
    for i in range(n_samples):
        p, r = (int(x) for x in torch.randint(1, 9, (2,), generator=gen))
        n = -(-(p + r) // B) * B
        ids = torch.randint(0, 90, (n,), generator=gen).tolist()
        samples.append(Sample(ids, [False] * p + [True] * (n - p), f"s{i}"))
    return collate_packed(pack_groups([[s] for s in samples], L, B, PAD))


# ------------------------------------------------------------ complementary masking


def test_complementary_rows_split_every_response_token_once(gen):
    data = sft_batch(gen)
    b = data["tokens"].shape[0]
    batch = build_diffusion_batch(
        data["tokens"], data["doc_ids"], B, MASK, NoiseConfig(0.2, 0.8), eligible=data["eligible"],
        generator=gen, complementary=True,
    )
    m, elig = batch.masked, data["eligible"]
    assert m.shape[0] == 2 * b
    # rows i and b+i are the same sample: response tokens masked in exactly one of them
    assert torch.equal(m[:b] ^ m[b:], elig)
    assert not (m[:b] & m[b:]).any()
    # prompt and filler tokens never masked, never weighted, in either copy or half
    w = batch.loss_weight
    for half in (w[:, :L], w[:, L:]):
        assert not (half[torch.cat([~elig, ~elig])] != 0).any()
    assert not (w[:, L:] != 0).any()  # clean half carries no loss
    assert torch.equal(w[:, :L] > 0, m)
    assert torch.equal(batch.input_ids[:, :L] == MASK, m)


# ------------------------------------------------------------------ mask-ratio band


@pytest.mark.parametrize("per_block", [False, True])
def test_mask_ratio_band_on_packed_sft(gen, per_block):
    lo, hi = 0.25, 0.55
    data = sft_batch(gen, n_samples=40)
    batch = build_diffusion_batch(
        data["tokens"], data["doc_ids"], B, MASK, NoiseConfig(lo, hi, per_block=per_block),
        eligible=data["eligible"], generator=gen,
    )
    t = batch.t
    assert float(t.min()) >= lo and float(t.max()) <= hi
    blk = block_index(data["doc_ids"], B)
    for r in range(t.shape[0]):
        if per_block:  # constant inside each (document, block)
            for key in set(zip(data["doc_ids"][r].tolist(), blk[r].tolist())):
                sel = (data["doc_ids"][r] == key[0]) & (blk[r] == key[1])
                assert len(set(t[r][sel].tolist())) == 1
        else:
            assert len(set(t[r].tolist())) == 1
    # the realised ratio over many eligible tokens follows t
    big_t = torch.full((1, 20000), 0.4)
    eligible = torch.ones(1, 20000, dtype=torch.bool)
    doc = torch.zeros(1, 20000, dtype=torch.long)
    x0 = torch.zeros(1, 20000, dtype=torch.long)
    m = build_diffusion_batch(x0, doc, 20000, MASK, eligible=eligible, t=big_t, generator=gen).masked
    assert abs(float(m.float().mean()) - 0.4) < 0.015


# ----------------------------------------------------------------------------- CAP


def entropy_by_hand(row):
    z = sum(math.exp(v) for v in row)
    ps = [math.exp(v) / z for v in row]
    return -sum(p * math.log(p) for p in ps)


def test_cap_terms_hand_computed():
    logits = torch.tensor(
        [
            [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.5, 0.0], [0.3, -0.2, 0.9]],
        ]
    )  # [b=1, S=4, V=3]
    labels = torch.tensor([[0, 2, 0, 2]])
    # position 0: masked, argmax 0 == label -> counted
    # position 1: masked, argmax 2 == label -> counted
    # position 2: masked, argmax 1 != label 0 -> not counted
    # position 3: not masked (weight 0), argmax 2 == label -> not counted
    weight = torch.tensor([[2.0, 1.25, 3.0, 0.0]])
    total, count = cap_confidence_terms(logits, labels, weight)
    expected = entropy_by_hand([2.0, 0.5, -1.0]) + entropy_by_hand([0.1, 0.2, 3.0])
    assert count.item() == 2
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # a bool mask selects the same positions
    total_b, count_b = cap_confidence_terms(logits, labels, weight > 0)
    assert total_b.item() == pytest.approx(expected, rel=1e-6) and count_b.item() == 2
    # nothing correct: zero, still differentiable
    x = logits.clone().requires_grad_(True)
    zero, none = cap_confidence_terms(x, torch.tensor([[1, 0, 2, 0]]), weight)
    zero.backward()
    assert none.item() == 0 and zero.item() == 0 and torch.equal(x.grad, torch.zeros_like(x))


def test_entropy_gradient_matches_autograd(gen):
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: token_entropy(v), (x,))
    logp = torch.log_softmax(x, -1)
    ref = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(token_entropy(x), ref)


def test_cap_lambda_zero_gradient_is_sft_gradient(gen):
    logits0 = torch.randn(2, 6, 11, generator=gen)
    labels = logits0.argmax(-1)
    labels[:, ::3] = (labels[:, ::3] + 1) % 11  # some masked tokens wrong
    weight = (torch.rand(2, 6, generator=gen) < 0.7).float() * 2.5

    def grad(lam):
        x = logits0.clone().requires_grad_(True)
        ce = torch.nn.functional.cross_entropy(x.reshape(-1, 11), labels.reshape(-1), reduction="none")
        sft_total, sft_count = weighted_loss_terms(ce.view(2, 6), weight, 12)
        if lam is None:
            loss = sft_total / sft_count
        else:
            loss = cap_loss(sft_total, sft_count, *cap_confidence_terms(x, labels, weight), lam)
        loss.backward()
        return x.grad

    plain = grad(None)
    assert torch.equal(grad(0.0), plain)
    # with lambda > 0 the entropy term changes the gradient, only on correct masked rows
    diff = (grad(0.5) - plain).abs().sum(-1) > 0
    correct_masked = (logits0.argmax(-1) == labels) & (weight > 0)
    assert diff.any() and torch.equal(diff, correct_masked)


# ------------------------------------------------------------- vocab parallel (gloo)


def _vocab_parallel_worker(rank, world, logits, labels, weight):
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shard = logits.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    total, count = vocab_parallel_cap_confidence_terms(shard, labels, weight, dist.group.WORLD)
    (3.0 * total).backward()
    empty = vocab_parallel_cap_confidence_terms(shard.detach(), labels, torch.zeros_like(weight), dist.group.WORLD)
    return {"total": total.detach(), "count": count, "grad": shard.grad, "empty": empty}


def test_vocab_parallel_cap_equals_unsharded(gen):
    world, V = 2, 10
    logits = torch.randn(3, 8, V, generator=gen)
    # ties for the maximum across shards: torch.argmax takes the first index (shard 0)
    logits[0, 0] = torch.tensor([0.0, 5.0, 1, 1, 1, 1, 1, 5.0, 1, 1])
    logits[0, 1] = torch.tensor([0.0, 1, 1, 1, 1, 1, 5.0, 1, 1, 1])  # max only on shard 1
    labels = logits.argmax(-1)
    labels[0, 0] = 7  # the tie's second occurrence: wrong under torch.argmax
    labels[1, ::2] = (labels[1, ::2] + 3) % V
    weight = (torch.rand(3, 8, generator=gen) < 0.8).float()
    weight[0, :2] = 1.0

    ref_x = logits.clone().requires_grad_(True)
    ref_total, ref_count = cap_confidence_terms(ref_x, labels, weight)
    (3.0 * ref_total).backward()

    outs = run_distributed(_vocab_parallel_worker, world, logits, labels, weight, timeout=120)
    for r, out in enumerate(outs):
        assert out["count"].item() == ref_count.item() > 0
        assert torch.allclose(out["total"], ref_total, rtol=1e-5, atol=1e-6)
        assert torch.allclose(out["grad"], ref_x.grad.chunk(world, dim=-1)[r], rtol=1e-5, atol=1e-6)
        assert out["empty"][0].item() == 0 and out["empty"][1].item() == 0


def test_band_note_names_heavy_complement_weights_from_just_above_the_threshold():
    """Complement rows weigh 1/(1 - t): the note appears once 1/(1 - m_max) exceeds 20, and says by how much."""
    from llada_cpt.stages.sft import COMPLEMENT_WEIGHT_NOTE, band_note

    assert COMPLEMENT_WEIGHT_NOTE == 20.0
    assert band_note(0.05, 0.95) is None  # the tiny_sft band: weight 20 exactly, at the threshold
    assert band_note(0.3, 0.8) is None
    note = band_note(0.05, 0.96)
    assert note is not None and "weights 1/(1 - t) up to 25" in note and "down to 0.04" in note
    assert "unbounded" in band_note(1e-3, 1.0) and "[0.001, 1]" in band_note(1e-3, 1.0)

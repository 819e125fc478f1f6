"""DPO on the block-diffusion ELBO: per-sample ELBO, shared pair noise, the loss and its gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

from llada_cpt.data.preference import collate_pairs
from llada_cpt.data.sft import Sample, pack_groups
from llada_cpt.diffusion.dpo import dpo_loss, elbo_from_token_loss, sample_pair_noise
from llada_cpt.diffusion.inputs import build_diffusion_batch
from llada_cpt.diffusion.masks import block_index, document_positions
from llada_cpt.diffusion.noise import NoiseConfig

MASK, EOD, PAD, B, L = 99, 98, 97, 4, 48


def packed_pairs(gen, n_pairs=6):
    """Pairs with a shared prompt and responses of different lengths, packed and collated."""
    groups = []
    for k in range(n_pairs):
        p = int(torch.randint(1, 7, (1,), generator=gen))
        prompt = torch.randint(0, 90, (p,), generator=gen).tolist()
        members = []
        for _ in range(2):
            r = int(torch.randint(1, 12, (1,), generator=gen))
            n = -(-(p + r) // B) * B
            ids = prompt + torch.randint(0, 90, (n - p,), generator=gen).tolist()
            members.append(Sample(ids, [False] * p + [True] * (n - p), f"pair{k}"))
        groups.append(members)
    return collate_pairs(pack_groups(groups, L, B, PAD, with_sample_index=True))


def test_elbo_hand_computed():
    ce = torch.tensor([[0.5, 1.0, 2.0, 0.25, 3.0, 4.0]])
    w = torch.tensor([[2.0, 0.0, 1.0, 4.0, 1.5, 0.0]])
    idx = torch.tensor([[0, 0, 1, 1, 2, -1]])
    elbo = elbo_from_token_loss(ce, w, idx)
    expected = [-(0.5 * 2.0), -(2.0 * 1.0 + 0.25 * 4.0), -(3.0 * 1.5)]
    assert elbo.tolist() == pytest.approx(expected)
    # index of one half is repeated over the [x_t ; x_0] layout (the clean half has weight 0)
    ce2 = torch.cat([ce, torch.full_like(ce, 7.0)], dim=1)
    w2 = torch.cat([w, torch.zeros_like(w)], dim=1)
    assert elbo_from_token_loss(ce2, w2, idx).tolist() == pytest.approx(expected)
    assert elbo_from_token_loss(ce, w, idx, num_samples=5).shape == (5,)
    with pytest.raises(ValueError, match="does not match"):
        elbo_from_token_loss(ce, w, idx[:, :4])


def test_dpo_policy_equals_reference_gives_log2_and_right_gradient_signs(gen):
    pc = torch.randn(5, generator=gen).requires_grad_(True)
    pr = torch.randn(5, generator=gen).requires_grad_(True)
    loss, metrics = dpo_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert metrics["reward_margin"].item() == 0 and metrics["accuracy"].item() == 0
    loss.backward()
    # raising the chosen ELBO lowers the loss, raising the rejected one raises it
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert pc.grad.tolist() == pytest.approx([-0.1 * 0.5 / 5] * 5)


def test_dpo_hand_computed_and_metrics():
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    rc, rr = torch.tensor([-11.0, -18.0]), torch.tensor([-12.0, -16.0])
    beta = 0.5
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta)
    margins = [beta * ((-10 + 11) - (-12 + 12)), beta * ((-20 + 18) - (-15 + 16))]
    expected = sum(-math.log(1 / (1 + math.exp(-z))) for z in margins) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"].item() == 0.5
    assert m["reward_margin"].item() == pytest.approx(sum(margins) / 2)
    assert m["chosen_reward"].item() == pytest.approx(beta * (1 - 2) / 2)
    total, _ = dpo_loss(pc, pr, rc, rr, beta=beta, reduction="sum")
    assert total.item() == pytest.approx(2 * expected, rel=1e-6)


@pytest.mark.parametrize("per_block", [False, True])
def test_pair_noise_shared_between_chosen_and_rejected(gen, per_block):
    batch = packed_pairs(gen)
    doc, idx, elig = batch["doc_ids"], batch["sample_index"], batch["eligible"]
    cfg = NoiseConfig(0.2, 0.7, per_block=per_block)
    t, masked = sample_pair_noise(doc, idx, elig, B, cfg, gen)
    assert not (masked & ~elig).any()
    real = idx >= 0
    assert float(t[real].min()) >= 0.2 and float(t[real].max()) <= 0.7
    pos = document_positions(doc)
    blk = block_index(doc, B)
    n_pairs = int(batch["num_pairs"])
    shared = per_pair_t = 0
    for p in range(n_pairs):
        c, r = idx == 2 * p, idx == 2 * p + 1
        assert c.any() and r.any()
        row = int(c.nonzero()[0, 0])
        assert r[row].any()  # both members in one packed row
        common = min(int(c[row].sum()), int(r[row].sum()))
        pc, pr = pos[row][c[row]], pos[row][r[row]]
        assert torch.equal(pc[:common], pr[:common])  # positions line up from the document start
        tc, tr = t[row][c[row]], t[row][r[row]]
        mc, mr = masked[row][c[row]], masked[row][r[row]]
        assert torch.equal(tc[:common], tr[:common])
        both = elig[row][c[row]][:common] & elig[row][r[row]][:common]
        assert torch.equal(mc[:common][both], mr[:common][both])
        shared += int(both.sum())
        if per_block:
            bc = blk[row][c[row]]
            for k in set(bc.tolist()):
                assert len(set(tc[bc == k].tolist())) == 1
        else:
            assert len(set(tc.tolist())) == 1
        per_pair_t += 1
    assert shared > 0 and per_pair_t == n_pairs
    # different pairs draw different t
    firsts = {float(t[idx == 2 * p][0]) for p in range(n_pairs)}
    assert len(firsts) == n_pairs


def test_packed_dpo_end_to_end_policy_equals_reference(gen):
    """Same noise for policy and reference: identical models give exactly log 2 per pair."""
    batch = packed_pairs(gen)
    t, masked = sample_pair_noise(batch["doc_ids"], batch["sample_index"], batch["eligible"], B, NoiseConfig(), gen)
    diff = build_diffusion_batch(batch["tokens"], batch["doc_ids"], B, MASK, t=t, masked=masked,
                                 eligible=batch["eligible"])
    emb = torch.nn.Embedding(100, 100)

    def elbos(model_scale):
        logits = emb(diff.input_ids) * model_scale
        ce = F.cross_entropy(logits.reshape(-1, 100), diff.labels.reshape(-1), reduction="none").view_as(diff.labels)
        return elbo_from_token_loss(ce, diff.loss_weight, batch["sample_index"]).view(-1, 2)

    policy, ref = elbos(1.0), elbos(1.0).detach()
    assert policy.shape == (int(batch["num_pairs"]), 2)
    assert (policy.detach() < 0).all()  # every response has masked tokens under this seed
    loss, _ = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1])
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)
    loss.backward()
    assert emb.weight.grad.abs().sum() > 0
    other, _ = dpo_loss(*elbos(1.5).unbind(1), ref[:, 0], ref[:, 1])
    assert other.item() != pytest.approx(math.log(2.0), rel=1e-6)

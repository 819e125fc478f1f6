"""DPO on the block-diffusion ELBO (report section 5.3, eq. 7-8).

Exact log-likelihoods of a diffusion LM are intractable, so each response's
log-likelihood is replaced by its ELBO, estimated with one Monte Carlo sample:

    B(x | c) = sum over masked response tokens of  (1/t) * log p(x_k | c, x_t)
             = -(weighted CE summed over the sample's tokens)

i.e. the SFT objective's inner sum, per sample and not normalised.  The
estimate is noisy; two choices keep the noise out of the DPO margin:

* policy and reference see the *same* ``t`` and mask (pass ``t``/``masked`` to
  ``build_diffusion_batch`` for both forwards), so ``Delta B`` compares the two
  models on identical inputs;
* chosen and rejected responses of a pair share ``t`` and the Bernoulli draws
  position by position (:func:`sample_pair_noise`), as far as their lengths
  allow, so the preference margin is not dominated by a lucky mask.

Packed layout (see :mod:`llada_cpt.data.preference`): a pair's chosen and
rejected documents sit in the same packed row; ``sample_index`` is ``2p`` on the
chosen and ``2p + 1`` on the rejected tokens of pair ``p`` (-1 on filler).
Under context parallelism the per-sample ELBO is a partial sum on each rank:
all-reduce it over the CP group before :func:`dpo_loss`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .masks import document_positions
from .noise import NoiseConfig, sample_mask, sample_timesteps

__all__ = ["elbo_from_token_loss", "sample_pair_noise", "dpo_loss"]


def elbo_from_token_loss(
    token_ce: torch.Tensor,
    loss_weight: torch.Tensor,
    per_sample_index: torch.Tensor,
    num_samples: Optional[int] = None,
) -> torch.Tensor:
    """Per-sample ELBO ``-sum(w * CE)`` (float32, ``[num_samples]``, differentiable).

    ``per_sample_index`` assigns each token its sample (-1: none).  It has the
    shape of ``token_ce`` or, for the ``[x_t ; x_0]`` layout, of one half (it is
    then repeated; the clean half has weight 0 anyway).
    """
    if token_ce.shape != loss_weight.shape:
        raise ValueError(f"token loss {tuple(token_ce.shape)} vs weight {tuple(loss_weight.shape)}")
    idx = per_sample_index
    if idx.shape != token_ce.shape:
        if idx.shape[:-1] == token_ce.shape[:-1] and 2 * idx.shape[-1] == token_ce.shape[-1]:
            idx = torch.cat([idx, idx], dim=-1)
        else:
            raise ValueError(f"sample index {tuple(idx.shape)} does not match token loss {tuple(token_ce.shape)}")
    valid = idx >= 0
    if num_samples is None:
        num_samples = int(idx.max()) + 1 if idx.numel() else 0
    contrib = -(token_ce.float() * loss_weight.float())
    out = torch.zeros(num_samples, dtype=torch.float32, device=token_ce.device)
    return out.index_add(0, idx[valid].long(), contrib[valid])


def sample_pair_noise(
    doc_ids: torch.Tensor,
    sample_index: torch.Tensor,
    eligible: torch.Tensor,
    block_size: int,
    noise: NoiseConfig = NoiseConfig(),
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(t, masked)`` of shape ``[b, L]`` with chosen and rejected of a pair noised alike.

    Both members of pair ``p`` read ``t`` and the Bernoulli outcome at document
    position ``k`` from one shared draw for ``(p, k)``; since they share the
    prompt, position ``k`` of both responses lines up, and the longer response's
    tail beyond the shorter one's end gets its own draws.  ``t`` is one value per
    pair (or per pair and block with ``noise.per_block``) in the mask-ratio band.
    """
    if not (doc_ids.shape == sample_index.shape == eligible.shape) or doc_ids.dim() != 2:
        raise ValueError("doc_ids, sample_index and eligible must all be [b, L]")
    b, L = doc_ids.shape
    rows = torch.arange(b, device=doc_ids.device).unsqueeze(1).expand(b, L)
    pair = torch.div(sample_index, 2, rounding_mode="floor").clamp(min=0)
    # one frame row per (packed row, pair): works for per-row and batch-global indices
    keys, frame_row = torch.unique(rows * (int(pair.max()) + 1) + pair, return_inverse=True)
    frame_docs = torch.zeros(keys.numel(), L, dtype=torch.long, device=doc_ids.device)
    t_frame = sample_timesteps(frame_docs, block_size, noise, generator)
    masked_frame = sample_mask(t_frame, torch.ones_like(frame_docs, dtype=torch.bool), generator)
    pos = document_positions(doc_ids)
    real = sample_index >= 0
    t = torch.where(real, t_frame[frame_row, pos], torch.ones_like(t_frame[frame_row, pos]))
    masked = masked_frame[frame_row, pos] & eligible & real
    return t, masked


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    reduction: str = "mean",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``-log sigmoid(beta * (dB_chosen - dB_rejected))`` (report eq. 8) over ``[P]`` pairs.

    ``dB = B_policy - B_ref``; the reference ELBOs are treated as constants.
    ``reduction='sum'`` gives the sum for layout-independent normalisation across
    micro-batches and DP ranks (divide by the global pair count).  Metrics are
    detached means over the pairs: implicit rewards ``beta * dB`` of chosen and
    rejected, their margin, and the fraction of pairs with a positive margin.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    chosen_reward = beta * (policy_chosen.float() - ref_chosen.detach().float())
    rejected_reward = beta * (policy_rejected.float() - ref_rejected.detach().float())
    margin = chosen_reward - rejected_reward
    losses = -F.logsigmoid(margin)
    loss = losses.sum() if reduction == "sum" else losses.mean()
    with torch.no_grad():
        metrics = {
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "reward_margin": margin.mean(),
            "accuracy": (margin > 0).float().mean(),
            "pairs": torch.tensor(float(margin.numel())),
        }
    return loss, metrics

"""Build model inputs, labels and loss weights of one diffusion batch.

The ``[x_t ; x_0]`` layout (BDLM) or the single ``x_t`` copy (MDLM, block size
``>= L``: the clean half would be dead weight) from a batch of clean packed
token ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layout import AttentionLayout
from .loss import elbo_weights
from .noise import NoiseConfig, complementary_mask, sample_mask, sample_timesteps

__all__ = ["DiffusionBatch", "build_diffusion_batch", "is_mdlm"]


def is_mdlm(block_size: int, seq_length: int) -> bool:
    """A block covering the whole sequence is MDLM: drop the clean half."""
    return block_size >= seq_length


@dataclass
class DiffusionBatch:
    """Model-ready tensors; ``S = 2L`` (BDLM) or ``L`` (MDLM)."""

    input_ids: torch.Tensor  # [b, S]
    labels: torch.Tensor  # [b, S] clean tokens (meaningful where loss_weight > 0)
    loss_weight: torch.Tensor  # [b, S] 1/t on masked x_t positions, else 0
    layout: AttentionLayout
    masked: torch.Tensor  # [b, L]
    t: torch.Tensor  # [b, L]
    eligible: torch.Tensor  # [b, L]

    @property
    def num_eligible(self) -> torch.Tensor:
        return self.eligible.sum()

    @property
    def position_ids(self) -> torch.Tensor:
        return self.layout.position_ids(local=False)

    @property
    def mask_ratio(self) -> float:
        """Fraction of eligible tokens that are masked (logged every step)."""
        return float(self.masked.sum()) / max(1, int(self.eligible.sum()))


def build_diffusion_batch(
    x0: torch.Tensor,
    doc_ids: torch.Tensor,
    block_size: int,
    mask_id: int,
    noise: NoiseConfig = NoiseConfig(),
    eligible: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    complementary: bool = False,
    masked: Optional[torch.Tensor] = None,
    t: Optional[torch.Tensor] = None,
) -> DiffusionBatch:
    """Noise ``x0`` (``[b, L]``) and lay it out for the model.

    ``eligible`` marks loss-bearing tokens (default: all); ``masked``/``t`` may be
    given to reuse a mask (DPO: same mask for policy and reference), and
    ``complementary`` doubles the batch with the inverse mask of each sample
    (sample ``i`` and its complement are rows ``i`` and ``b + i``).
    """
    if x0.shape != doc_ids.shape or x0.dim() != 2:
        raise ValueError(f"x0 {tuple(x0.shape)} and doc_ids {tuple(doc_ids.shape)} must both be [b, L]")
    L = x0.shape[1]
    if block_size < L and L % block_size:
        raise ValueError(f"block size {block_size} does not divide seq_length {L}")
    if eligible is None:
        eligible = torch.ones_like(x0, dtype=torch.bool)
    if t is None:
        t = sample_timesteps(doc_ids, block_size, noise, generator)
    if masked is None:
        masked = sample_mask(t, eligible, generator)
    if complementary:
        x0, doc_ids, eligible = (torch.cat([a, a]) for a in (x0, doc_ids, eligible))
        masked = torch.cat([masked, complementary_mask(masked, eligible[: masked.shape[0]])])
        # the complement of a ratio-t mask has ratio 1 - t; weight it accordingly
        t = torch.cat([t, (1.0 - t).clamp(min=noise.mask_ratio_min)])
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    w = elbo_weights(masked, t)
    mdlm = is_mdlm(block_size, L)
    layout = AttentionLayout(doc_ids=doc_ids, block_size=min(block_size, L), mdlm=mdlm)
    if mdlm:
        input_ids, labels, weight = xt, x0, w
    else:
        input_ids = torch.cat([xt, x0], dim=1)
        labels = torch.cat([x0, x0], dim=1)
        weight = torch.cat([w, torch.zeros_like(w)], dim=1)
    return DiffusionBatch(input_ids, labels, weight, layout, masked, t, eligible)

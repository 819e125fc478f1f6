"""Build model inputs, labels and loss weights of one diffusion batch.

The ``[x_t ; x_0]`` layout (BDLM) or the single ``x_t`` copy (MDLM, block size
``>= L``: the clean half would be dead weight) from a batch of clean packed
token ids.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch

from .layout import AttentionLayout
from .loss import elbo_weights
from .noise import NoiseConfig, complementary_mask, sample_mask, sample_timesteps

__all__ = ["noised_half", "DiffusionBatch", "build_diffusion_batch", "is_mdlm"]


def is_mdlm(block_size: int, seq_length: int) -> bool:
    """A block covering the whole sequence is MDLM: drop the clean half."""
    return block_size >= seq_length


@dataclass
class DiffusionBatch:
    """Model-ready tensors; ``S = 2L`` (BDLM) or ``L`` (MDLM)."""

    # fields laid out over the model input [b, S] (x_t half first): what noised_half cuts and the
    # context-parallel split slices by token; subclasses with more per-token fields extend it
    token_fields: ClassVar[Tuple[str, ...]] = ("input_ids", "labels", "loss_weight")
    # fields laid out over the L positions of one copy [b, L]: the context-parallel split slices them by position
    position_fields: ClassVar[Tuple[str, ...]] = ("masked", "t", "eligible")

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


def noised_half(batch: DiffusionBatch) -> DiffusionBatch:
    """The loss's view of a ``[x_t ; x_0]`` batch: every per-token ``[b, S]`` field cut to its x_t half.

    Only x_t positions carry loss weight, so the LM head and the loss need not see
    the clean half (``training/step.py`` feeds the head the first half of the
    hidden states).  The per-token fields are the class's ``token_fields``
    (``[x_t local ; x_0 local]`` under context parallelism, so the first half is
    still the x_t half); ``[b, L]`` fields (``masked``/``t``/``eligible``, a
    subclass's per-position indices) and the layout are kept.  A single-copy
    layout (MDLM, causal) is returned unchanged.
    """
    if batch.layout.num_copies == 1:
        return batch
    S = batch.input_ids.shape[1]
    cut = {}
    for name in type(batch).token_fields:
        value = getattr(batch, name)
        if value is None or value.shape[1] == S // 2:  # absent, or already computed on the half
            continue
        if value.shape[1] != S:
            raise ValueError(f"per-token field `{name}` has {value.shape[1]} positions; the input has {S}")
        cut[name] = value[:, :S // 2]
    return dataclasses.replace(batch, **cut)


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
        # the complement of a ratio-t mask has ratio 1 - t: weighted by its own ratio, E[sum w] = #eligible
        # for both rows.  With an asymmetric band 1 - t lies in [1 - m_max, 1 - m_min], outside the band;
        # clamping it to the band would under-weight the complement.  t = 1 leaves the complement empty.
        t = torch.cat([t, 1.0 - t])
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

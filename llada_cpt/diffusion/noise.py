"""Forward (masking) process of masked diffusion: timesteps and token masks.

``t ~ U[m_min, m_max]`` (``[eps, 1]`` by default), sampled once per sequence or
once per block, and every loss-eligible token is masked independently with
probability ``t`` (``alpha_t = 1 - t``).  Complementary masking reuses a sample
with the inverse mask over the eligible tokens so that every eligible token is
trained exactly once across the pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .masks import block_index

__all__ = ["NoiseConfig", "sample_timesteps", "sample_mask", "complementary_mask"]


@dataclass(frozen=True)
class NoiseConfig:
    """Mask-ratio band and granularity of ``t``."""

    mask_ratio_min: float = 1e-3  # eps of the report; keeps the 1/t weight bounded
    mask_ratio_max: float = 1.0
    per_block: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio_min <= self.mask_ratio_max <= 1.0:
            raise ValueError(
                "mask ratio band must satisfy 0 < mask_ratio_min <= mask_ratio_max <= 1, "
                f"got [{self.mask_ratio_min}, {self.mask_ratio_max}]"
            )


def _uniform(shape, lo: float, hi: float, generator: Optional[torch.Generator], device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return (lo + (hi - lo) * u).to(torch.float32)


def sample_timesteps(
    doc_ids: torch.Tensor,
    block_size: int,
    cfg: NoiseConfig,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-position ``t`` of shape ``doc_ids.shape`` (``[b, L]``).

    Per block, each (document, block) pair of a sequence draws its own ``t``;
    per sequence, all positions share one value.
    """
    b, L = doc_ids.shape
    lo, hi = cfg.mask_ratio_min, cfg.mask_ratio_max
    if not cfg.per_block:
        return _uniform((b, 1), lo, hi, generator, doc_ids.device).expand(b, L).contiguous()
    blk = block_index(doc_ids, block_size)
    boundary = torch.ones_like(doc_ids, dtype=torch.bool)
    boundary[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]) | (blk[:, 1:] != blk[:, :-1])
    group = torch.cumsum(boundary.long(), dim=1) - 1  # [b, L], consecutive block ids
    t_groups = _uniform((b, L), lo, hi, generator, doc_ids.device)
    return torch.gather(t_groups, 1, group)


def sample_mask(
    t: torch.Tensor,
    eligible: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Bernoulli(t) mask restricted to loss-eligible positions."""
    u = torch.rand(t.shape, generator=generator, device=t.device, dtype=torch.float32)
    return (u < t) & eligible


def complementary_mask(masked: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """The logical inverse of ``masked`` over the eligible tokens."""
    return eligible & ~masked


def sample_noise_per_row(
    doc_ids: torch.Tensor,
    eligible: torch.Tensor,
    block_size: int,
    cfg: NoiseConfig,
    row_seeds: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, masked)`` with row ``i`` drawn from its own generator seeded by ``row_seeds[i]``.

    Seeding per sample (e.g. from the global sample index) makes the noise of a
    sample independent of how the global batch is split over data-parallel
    ranks and micro-batches, and of restarts: resume is exact without RNG state.
    """
    ts, ms = [], []
    for row, seed in enumerate(row_seeds):
        g = torch.Generator(device=doc_ids.device).manual_seed(int(seed))
        t = sample_timesteps(doc_ids[row : row + 1], block_size, cfg, g)
        ts.append(t)
        ms.append(sample_mask(t, eligible[row : row + 1], g))
    return torch.cat(ts), torch.cat(ms)

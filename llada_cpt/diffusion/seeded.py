"""Noise seeded per global sample position: the batch builder of every stage that trains on the ELBO.

A sample's mask (``t``, Bernoulli draws) and its masked-embedding noise come from
a seed derived from ``(base seed, global sample position, salt)`` only, so they
do not depend on the data-parallel split, on restarts, or on which tool builds
the batch (training, validation, ``llada-cpt eval``).
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import torch

from .inputs import DiffusionBatch, build_diffusion_batch
from .noise import NoiseConfig, sample_noise_per_row

__all__ = ["sample_seed", "noise_config", "make_batch"]


def sample_seed(base_seed: int, position: int, salt: str = "noise") -> int:
    """A stable 63-bit seed for one global sample position."""
    digest = hashlib.blake2b(f"{salt}:{base_seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def noise_config(diffusion: Any) -> NoiseConfig:
    """The :class:`NoiseConfig` of a ``diffusion`` config section (mask-ratio band, per-block ``t``)."""
    return NoiseConfig(diffusion.mask_ratio_min, diffusion.mask_ratio_max, diffusion.per_block_timesteps)


def make_batch(tokens: torch.Tensor, doc_ids: torch.Tensor, positions: Sequence[int], block_size: int,
               mask_id: int, noise: NoiseConfig, base_seed: int, eligible: Optional[torch.Tensor] = None,
               salt: str = "noise", complementary: bool = False) -> DiffusionBatch:
    """Noise one micro-batch with per-sample seeds and lay it out for the model.

    The seeds of the global sample ``positions`` draw the mask (``t``, Bernoulli) and, through
    ``layout.row_seeds``, the masked-embedding noise.  ``complementary`` appends each row's complement
    (rows ``b + i``), which shares its seed.
    """
    if eligible is None:
        eligible = torch.ones_like(tokens, dtype=torch.bool)
    seeds = [sample_seed(base_seed, p, salt) for p in positions]
    t, masked = sample_noise_per_row(doc_ids, eligible, block_size, noise, seeds)
    batch = build_diffusion_batch(tokens, doc_ids, block_size, mask_id, eligible=eligible, t=t, masked=masked,
                                  complementary=complementary)
    batch.layout.row_seeds = torch.tensor(seeds * (2 if complementary else 1), dtype=torch.long)
    return batch

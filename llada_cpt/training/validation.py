"""The ELBO validation every tool shares: the training loop's evaluation and ``llada-cpt eval``.

Validation batches are packed sequences noised with seeds of their sample
position and a fixed salt (:func:`llada_cpt.diffusion.seeded.make_batch`), so
the same sequences get the same noise at every evaluation and in every tool:
``llada-cpt eval`` on the run's validation data reproduces the logged loss.
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence

import torch

from ..diffusion.inputs import DiffusionBatch
from ..diffusion.noise import NoiseConfig
from ..diffusion.seeded import make_batch

__all__ = ["packed_eval_batches", "elbo_loss"]


def packed_eval_batches(ds: Sequence[dict], micro_batch_size: int, dp_rank: int, dp_size: int, steps: int,
                        block_size: int, mask_id: int, noise: NoiseConfig, base_seed: int,
                        salt: str = "valid") -> List[List[DiffusionBatch]]:
    """Up to ``steps`` single-micro-batch evaluation steps of this data-parallel rank over the packed
    dataset ``ds`` (items with ``tokens`` / ``doc_ids``); stops where a micro-batch would run past the end."""
    m = micro_batch_size
    out = []
    for k in range(steps):
        first = k * m * dp_size + dp_rank * m
        if first + m > len(ds):
            break
        samples = [ds[i] for i in range(first, first + m)]
        tokens = torch.stack([s["tokens"] for s in samples])
        docs = torch.stack([s["doc_ids"] for s in samples])
        out.append([make_batch(tokens, docs, range(first, first + m), block_size, mask_id, noise, base_seed,
                               salt=salt)])
    return out


def elbo_loss(groups: Sequence[Sequence[DiffusionBatch]], step: Callable) -> dict:
    """Loss (``sum(w * CE) / eligible`` over all groups), perplexity and the eligible-token count.

    ``step(batches)`` is one forward-only pass returning a :class:`llada_cpt.training.step.StepResult`.
    """
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batches in groups:
            res = step(batches)
            total += res.loss_sum
            count += res.num_eligible
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}

"""Diffusion ELBO loss with a normalisation that does not depend on the parallel layout.

Per token the weight is ``-alpha'_t / (1 - alpha_t) = 1/t`` on masked positions
of the x_t half and 0 elsewhere.  The reported loss is

    sum_over_global_batch(w * CE) / number_of_loss_eligible_tokens_in_global_batch

The denominator counts eligible tokens (every real token in CPT, response tokens
in SFT), not masked ones, so it is independent of the random mask.  Each
micro-batch therefore returns the pair ``(weighted_sum, num_eligible)``; the
training step adds both over micro-batches and DP/CP ranks before dividing
(Megatron's ``calculate_per_token_loss`` path), which makes the loss and the
gradients identical for any DP/CP/PP/grad-accumulation split.
"""
from __future__ import annotations

import torch

__all__ = ["elbo_weights", "weighted_loss_terms", "normalised_loss"]


def elbo_weights(masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``1/t`` on masked positions, 0 elsewhere (float32)."""
    return torch.where(masked, 1.0 / t.float(), torch.zeros_like(t, dtype=torch.float32))


def weighted_loss_terms(
    token_loss: torch.Tensor, loss_weight: torch.Tensor, num_eligible: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(w * CE), num_eligible)`` of one micro-batch; shapes of loss and weight must match."""
    if token_loss.shape != loss_weight.shape:
        raise ValueError(f"token loss {tuple(token_loss.shape)} vs weight {tuple(loss_weight.shape)}")
    total = (token_loss.float() * loss_weight.float()).sum()
    count = torch.as_tensor(num_eligible, dtype=torch.float32, device=total.device)
    return total, count


def normalised_loss(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Loss of a whole (global) batch from summed terms; an empty batch gives 0, not NaN."""
    return total / count.clamp(min=1.0)

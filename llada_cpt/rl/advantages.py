"""Group-relative advantages (GRPO/GTPO): z-score of each rollout's reward within its prompt's group.

``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the G rollouts of one prompt.  The
population std is the default (as in the reference GTPO ``z_score_normalize``);
a group whose rewards are all equal carries no learning signal and gets exactly
zero (not ``0/eps`` rounding noise), which is also why dynamic sampling drops it.
"""
from __future__ import annotations

import torch

__all__ = ["group_advantages"]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, unbiased: bool = False) -> torch.Tensor:
    """Advantages ``[N, G]`` from rewards ``[N, G]`` (N prompts, G rollouts each), float32."""
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN/inf; fix the reward function (or drop those groups) first")
    r = rewards.float()
    mean = r.mean(dim=1, keepdim=True)
    if unbiased and r.shape[1] < 2:
        raise ValueError("unbiased std needs groups of at least 2 rollouts")
    std = r.std(dim=1, keepdim=True, unbiased=unbiased)
    adv = (r - mean) / (std + eps)
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(adv), adv)

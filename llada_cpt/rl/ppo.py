"""Per-token PPO-clip objective with asymmetric clipping, optional k3 KL and entropy (DAPO/GTPO style).

For every target token (``mask`` True), with ``r = exp(logp - old_logp)``:

    pg  = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
    kl  = exp(ref - logp) - (ref - logp) - 1          (k3 estimator, >= 0)
    tok = pg + kl_coef * kl - entropy_coef * entropy

Aggregation is the token-level mean over the *global* batch (DAPO): each call
returns sums and the token count of one micro-batch; the trainer adds them over
micro-batches and data-parallel ranks and divides once, so the objective does
not depend on how the batch was split (same convention as ``diffusion/loss.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

from ..errors import ConfigError

__all__ = ["PPOConfig", "PPOTerms", "ppo_loss", "k3_kl", "token_entropy", "token_logprobs"]

_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps ratios finite; far outside any clip range


@dataclass
class PPOConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO "clip-higher"; set equal to eps_low for symmetric PPO
    kl_coef: float = 0.0  # 0 disables the KL term (no reference forward needed)
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.eps_low < 1.0:
            raise ConfigError(f"rl.ppo.eps_low must be in (0, 1), got {self.eps_low}")
        if not self.eps_high > 0.0:
            raise ConfigError(f"rl.ppo.eps_high must be > 0, got {self.eps_high}")
        for name in ("kl_coef", "entropy_coef"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0.0):
                raise ConfigError(f"rl.ppo.{name} must be a finite number >= 0, got {v}")


@dataclass
class PPOTerms:
    """Token sums of one micro-batch.  ``loss_sum`` carries the gradient; the others are detached metrics.

    Add terms with ``+`` (or all-reduce each field) and call :meth:`means` once.
    """

    loss_sum: torch.Tensor
    count: torch.Tensor
    pg_sum: torch.Tensor
    kl_sum: torch.Tensor
    entropy_sum: torch.Tensor
    clipped_sum: torch.Tensor  # tokens whose gradient the clip removed
    ratio_sum: torch.Tensor

    def __add__(self, other: "PPOTerms") -> "PPOTerms":
        return PPOTerms(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def loss(self) -> torch.Tensor:
        """Token-mean loss (differentiable); an empty batch gives 0, not NaN."""
        return self.loss_sum / self.count.clamp(min=1.0)

    def means(self) -> dict[str, float]:
        """Logged metrics: loss, pg_loss, kl, entropy, clip_fraction, ratio, tokens."""
        n = float(self.count.clamp(min=1.0))
        return {
            "loss": float(self.loss_sum.detach()) / n,
            "pg_loss": float(self.pg_sum) / n,
            "kl": float(self.kl_sum) / n,
            "entropy": float(self.entropy_sum) / n,
            "clip_fraction": float(self.clipped_sum) / n,
            "ratio": float(self.ratio_sum) / n,
            "tokens": float(self.count),
        }


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1``."""
    d = (ref_logp.float() - logp.float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(d) - d - 1.0


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the predictive distribution at each position: ``logsumexp(z) - sum(p * z)``."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    return lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` per position (float32); ``logits [..., V]``, ``targets [...]``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PPOConfig = PPOConfig(),
    ref_logp: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    logits: Optional[torch.Tensor] = None,
) -> PPOTerms:
    """PPO-clip sums over the ``mask``-ed (bool) tokens of one micro-batch (see module docstring).

    ``logp``/``old_logp``/``ref_logp``/``mask``/``entropy`` share a shape (e.g. ``[b, S]``);
    ``advantages`` is per token (same shape) or per sequence (``[b]``, broadcast
    over the last dim).  Entropy comes from ``entropy`` or is computed from
    ``logits [..., V]``; it is needed when ``entropy_coef > 0`` and logged otherwise.
    """
    if old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} must match"
        )
    if advantages.dim() == logp.dim() - 1 and advantages.shape == logp.shape[:-1]:
        advantages = advantages.unsqueeze(-1)
    adv = advantages.float().expand_as(logp)
    m = mask.bool()
    logp32 = logp.float()

    log_ratio = (logp32 - old_logp.float().detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    pg = -torch.minimum(unclipped, clipped)
    tok = pg
    with torch.no_grad():
        cut = ((adv > 0) & (ratio > 1.0 + cfg.eps_high)) | ((adv < 0) & (ratio < 1.0 - cfg.eps_low))

    kl = torch.zeros_like(logp32)
    if ref_logp is not None:
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp {tuple(ref_logp.shape)} must match logp {tuple(logp.shape)}")
        kl = k3_kl(logp32, ref_logp.detach())
        if cfg.kl_coef:
            tok = tok + cfg.kl_coef * kl
    elif cfg.kl_coef:
        raise ValueError("kl_coef > 0 needs ref_logp (log-probs of the reference model on the same tokens)")

    if entropy is None and logits is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.entropy_coef > 0):
            entropy = token_entropy(logits)
    if entropy is not None:
        if entropy.shape != logp.shape:
            raise ValueError(f"entropy {tuple(entropy.shape)} must match logp {tuple(logp.shape)}")
        if cfg.entropy_coef:
            tok = tok - cfg.entropy_coef * entropy.float()
    elif cfg.entropy_coef:
        raise ValueError("entropy_coef > 0 needs per-token entropy or the logits")

    def masked_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(m, x, torch.zeros_like(x)).sum()  # not x * m: -inf logp at padding

    with torch.no_grad():
        ent_sum = masked_sum(entropy.float()) if entropy is not None else torch.zeros((), device=logp.device)
        metrics = dict(pg_sum=masked_sum(pg), kl_sum=masked_sum(kl), entropy_sum=ent_sum,
                       clipped_sum=masked_sum(cut.float()), ratio_sum=masked_sum(ratio))
    return PPOTerms(loss_sum=masked_sum(tok), count=m.sum().float(), **metrics)

"""DAPO dynamic sampling: keep only informative groups, drawing more until the batch is full.

Two criteria (``criterion``):

* ``accuracy`` (DAPO, the default): drop groups whose accuracy is 0 or 1 (every
  rollout wrong, or every rollout right).  With a speed or format reward the
  rewards of an all-correct group still differ, yet the group says nothing about
  correctness, which is what DAPO filters on.
* ``reward_std``: drop groups whose G rewards are all equal: their advantage is
  zero everywhere (see :mod:`.advantages`) and would only dilute the token-mean
  loss.

Dropped groups are replaced by freshly drawn ones.  Drawing is bounded: at most
``ceil(num_groups * max_oversample)`` groups are drawn per batch, so a policy
that solves (or fails) everything cannot loop forever.  A batch that cannot be
filled comes back as ``skip=True`` with a reason, never as an exception; the
trainer then skips the update (and, with several data-parallel ranks, must agree
on skipping with an all-reduce of the flag).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar, get_args

import torch

from ..config.schema import DynamicSampling
from ..errors import ConfigError

__all__ = ["CRITERIA", "DynamicSamplingConfig", "SamplingStats", "SamplingResult", "dynamic_sample",
           "is_informative", "has_mixed_accuracy"]

CRITERIA = tuple(c for c in get_args(DynamicSampling) if c != "none")  # rl.dynamic_sampling less `none`

T = TypeVar("T")


@dataclass
class DynamicSamplingConfig:
    num_groups: int = 8  # groups (prompts) per training batch
    max_oversample: float = 3.0  # draw at most ceil(num_groups * max_oversample) groups
    draw_size: Optional[int] = None  # groups requested per callback call; None: num_groups
    min_groups: Optional[int] = None  # accept a partial batch of at least this many; None: must fill
    tolerance: float = 0.0  # reward_std: rewards whose spread is <= tolerance count as all equal
    enabled: bool = True  # False: keep every group (plain GRPO), still bounded and still filled
    criterion: str = "accuracy"  # accuracy (DAPO: drop accuracy 0 or 1) | reward_std (drop all-equal rewards)

    def __post_init__(self) -> None:
        if self.num_groups < 1:
            raise ConfigError(f"rl.dynamic_sampling.num_groups must be >= 1, got {self.num_groups}")
        if not self.max_oversample >= 1.0:
            raise ConfigError(f"rl.dynamic_sampling.max_oversample must be >= 1, got {self.max_oversample}")
        if self.draw_size is not None and self.draw_size < 1:
            raise ConfigError(f"rl.dynamic_sampling.draw_size must be >= 1 or null, got {self.draw_size}")
        if self.min_groups is not None and not 1 <= self.min_groups <= self.num_groups:
            raise ConfigError(
                f"rl.dynamic_sampling.min_groups must be in [1, num_groups={self.num_groups}] or null, "
                f"got {self.min_groups}"
            )
        if self.criterion not in CRITERIA:
            raise ConfigError(f"rl.dynamic_sampling `{self.criterion}` is not one of {', '.join(CRITERIA)}")
        if not self.tolerance >= 0.0:
            raise ConfigError(f"rl.dynamic_sampling.tolerance must be >= 0, got {self.tolerance}")

    @property
    def max_draw(self) -> int:
        return math.ceil(self.num_groups * self.max_oversample)


@dataclass
class SamplingStats:
    drawn: int = 0  # groups returned by the callback (and considered)
    kept: int = 0  # informative groups taken (the batch, unless skipped)
    dropped: int = 0  # uninformative groups (accuracy 0 or 1, or all-equal rewards)
    invalid: int = 0  # empty groups or non-finite rewards
    surplus: int = 0  # informative groups drawn after the batch was already full
    calls: int = 0  # callback invocations

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class SamplingResult(Generic[T]):
    groups: list[T] = field(default_factory=list)  # empty when skip
    stats: SamplingStats = field(default_factory=SamplingStats)
    skip: bool = False
    reason: Optional[str] = None


def _default_rewards(group: Any) -> Any:
    if hasattr(group, "rewards"):
        return group.rewards
    if isinstance(group, Mapping):
        return group["rewards"]
    return group


def is_informative(rewards: Any, tolerance: float = 0.0) -> Optional[bool]:
    """True if the rewards differ (spread > tolerance), False if all equal, None if unusable."""
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if r.numel() == 0 or not torch.isfinite(r).all():
        return None
    return bool(r.max() - r.min() > tolerance)


_WHAT = {"accuracy": "accuracy strictly between 0 and 1", "reward_std": "differing rewards"}


def has_mixed_accuracy(correct: Any) -> Optional[bool]:
    """True if some but not all rollouts are correct (``correct > 0``), False if none or all are, None if unusable."""
    c = torch.as_tensor(correct, dtype=torch.float64).reshape(-1)
    if c.numel() == 0 or not torch.isfinite(c).all():
        return None
    right = int((c > 0).sum())
    return 0 < right < c.numel()


def dynamic_sample(
    draw: Callable[[int], Sequence[T]],
    cfg: DynamicSamplingConfig,
    rewards_of: Callable[[T], Any] = _default_rewards,
    correct_of: Optional[Callable[[T], Any]] = None,
) -> SamplingResult[T]:
    """Fill a batch of ``cfg.num_groups`` informative groups from ``draw(n)`` (which returns up to n groups).

    ``rewards_of(group)`` gives the group's G rewards (default: ``group.rewards``,
    ``group["rewards"]`` or the group itself); ``correct_of(group)`` its G
    correctness values (``> 0`` = correct; default: ``rewards_of``), used by the
    ``accuracy`` criterion.  Groups beyond ``n`` in a callback's
    answer are ignored so that the oversampling bound holds; an empty answer means
    the source is exhausted.  Exceptions raised by ``draw``/``rewards_of`` are not
    swallowed: they are bugs or I/O failures, not an unfillable batch.
    """
    stats = SamplingStats()
    kept: list[T] = []
    exhausted = False
    step = cfg.draw_size or cfg.num_groups
    if cfg.criterion == "accuracy":
        def informative_of(group: T) -> Optional[bool]:
            return has_mixed_accuracy((correct_of or rewards_of)(group))
    else:
        def informative_of(group: T) -> Optional[bool]:
            return is_informative(rewards_of(group), cfg.tolerance)
    while len(kept) < cfg.num_groups and stats.drawn < cfg.max_draw:
        n = min(step, cfg.max_draw - stats.drawn)
        batch = list(draw(n))[:n]
        stats.calls += 1
        if not batch:
            exhausted = True
            break
        stats.drawn += len(batch)
        for group in batch:
            informative = informative_of(group)
            if informative is None:
                stats.invalid += 1
            elif not informative and cfg.enabled:
                stats.dropped += 1
            elif len(kept) < cfg.num_groups:
                kept.append(group)
            else:
                stats.surplus += 1
    stats.kept = len(kept)
    need = cfg.num_groups if cfg.min_groups is None else cfg.min_groups
    if stats.kept >= need:
        return SamplingResult(kept, stats)
    why = ("the prompt source is exhausted" if exhausted
           else f"the oversampling bound ({cfg.max_draw} groups) is reached")
    reason = (
        f"only {stats.kept} of the {need} required groups are informative ({_WHAT[cfg.criterion]}) after drawing "
        f"{stats.drawn} ({stats.dropped} dropped, {stats.invalid} invalid) and {why}"
    )
    return SamplingResult([], stats, skip=True, reason=reason)

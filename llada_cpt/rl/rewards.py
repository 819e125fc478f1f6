"""Rollout rewards: correctness, optional format, optional speed; each term is returned for logging.

``total = correctness_weight * correctness + format_weight * format + speed``

* correctness: 1 if the last ``\\boxed{}`` verifies against the ground truth, else 0.
* format: 1 if the completion holds exactly one ``\\boxed{}`` and nothing but closing
  punctuation (at most ``format_max_tail_chars`` characters) after it, else 0.
* speed (DiRL/GTPO speed reward, from the step map): the seeds (001-003) name a
  "Speed Reward mechanism" that optimises inference speed during RL; its formula is
  that of the reference GTPO/DiRL ``SpeedReward``:

      tpf  = n_generated / n_distinct_steps          (tokens per forward, in [1, B])
      t    = clip(tpf - 1, 0, B - 1),   T = B - 1
      ramp = (1 - cos(pi * t / T)) / 2                (0 at 1 token/step, 1 at B tokens/step)
      speed = v_slow + (v_fast - v_slow) * ramp

  with ``(v_slow, v_fast) = (0.5, 1.0)`` for a correct answer (a bonus growing with
  parallelism) and ``(0.0, -0.5)`` for a wrong one (a penalty for guessing fast).
  With the default ``correctness_weight = 1`` the total equals the reference's
  ``reward_funcs="accuracy,speed"`` sum; ``correctness_weight = 0`` gives its
  ``"speed"`` reward alone.  Positions with step ``-1`` (never generated) are ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..errors import ConfigError
from .verifier import MathVerifier, VerifierConfig, boxed_spans, extract_boxed_answer

__all__ = ["RewardConfig", "RewardTerms", "tokens_per_step", "speed_reward", "format_reward", "RewardFunction"]

StepMap = Union[torch.Tensor, Sequence[int]]


@dataclass
class RewardConfig:
    correctness_weight: float = 1.0
    format_weight: float = 0.0  # 0 keeps the format term out of the total (it is still reported)
    format_max_tail_chars: int = 32
    speed: bool = False
    speed_correct_slow: float = 0.5  # reward of a correct answer at 1 token/step
    speed_correct_fast: float = 1.0  # ... at block_size tokens/step
    speed_wrong_slow: float = 0.0
    speed_wrong_fast: float = -0.5
    verifier: VerifierConfig = field(default_factory=VerifierConfig)

    def __post_init__(self) -> None:
        for name in ("correctness_weight", "format_weight", "speed_correct_slow", "speed_correct_fast",
                     "speed_wrong_slow", "speed_wrong_fast"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"rl.reward.{name} must be a finite number, got {getattr(self, name)}")
        if self.format_max_tail_chars < 0:
            raise ConfigError(f"rl.reward.format_max_tail_chars must be >= 0, got {self.format_max_tail_chars}")


@dataclass
class RewardTerms:
    """One rollout's reward, term by term (each is logged)."""

    correctness: float
    format: float
    speed: float
    total: float
    tokens_per_step: float  # 0.0 when nothing was generated
    answer: Optional[str]  # the extracted boxed answer, None if absent


def tokens_per_step(step_map: StepMap) -> float:
    """Generated tokens per distinct decoding step; ``-1`` entries are ignored; 0.0 if none."""
    steps = torch.as_tensor(step_map).reshape(-1)
    steps = steps[steps >= 0]
    if steps.numel() == 0:
        return 0.0
    return steps.numel() / torch.unique(steps).numel()


def speed_reward(tpf: float, block_size: int, correct: bool, cfg: RewardConfig) -> float:
    """Cosine ramp of the module docstring between the slow (1 tok/step) and fast (B tok/step) values."""
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1 for the speed reward, got {block_size}")
    slow, fast = ((cfg.speed_correct_slow, cfg.speed_correct_fast) if correct
                  else (cfg.speed_wrong_slow, cfg.speed_wrong_fast))
    T = block_size - 1
    if T == 0:  # block size 1: every step commits exactly one token
        return slow
    t = min(max(tpf - 1.0, 0.0), float(T))
    return slow + (fast - slow) * (1.0 - math.cos(math.pi * t / T)) / 2.0


_TAIL_PUNCT = " \t\r\n.$\\]):;!"


def format_reward(text: str, max_tail_chars: int) -> float:
    """1.0 for exactly one ``\\boxed{}`` that ends the completion (up to closing punctuation)."""
    spans = boxed_spans(text) if isinstance(text, str) else []
    if len(spans) != 1:
        return 0.0
    tail = text[spans[0][1] + 1:].strip(_TAIL_PUNCT)
    return 1.0 if len(tail) <= max_tail_chars else 0.0


class RewardFunction:
    """``(completion, ground_truth, step_map, block_size) -> RewardTerms`` under one :class:`RewardConfig`."""

    def __init__(self, cfg: RewardConfig = RewardConfig(), verifier: Optional[MathVerifier] = None):
        self.cfg = cfg
        self.verifier = verifier if verifier is not None else MathVerifier(cfg.verifier)

    def __call__(
        self, completion: str, ground_truth: str, step_map: Optional[StepMap] = None, block_size: Optional[int] = None
    ) -> RewardTerms:
        cfg = self.cfg
        correct = self.verifier(completion, ground_truth)
        fmt = format_reward(completion, cfg.format_max_tail_chars)  # logged even when its weight is 0
        tpf = tokens_per_step(step_map) if step_map is not None else 0.0
        speed = 0.0
        if cfg.speed:
            if step_map is None or block_size is None:
                raise ConfigError("rl.reward.speed=true needs the rollout's step_map and block_size")
            speed = speed_reward(tpf, block_size, correct, cfg) if tpf > 0 else 0.0
        correctness = 1.0 if correct else 0.0
        total = cfg.correctness_weight * correctness + cfg.format_weight * fmt + speed
        return RewardTerms(correctness, fmt, speed, total, tpf, extract_boxed_answer(completion))

    def batch(
        self,
        completions: Sequence[str],
        ground_truths: Sequence[str],
        step_maps: Optional[Sequence[StepMap]] = None,
        block_size: Optional[int] = None,
    ) -> dict[str, torch.Tensor]:
        """Per-term float tensors ``[N]`` (``correctness``, ``format``, ``speed``, ``total``, ``tokens_per_step``)."""
        if len(completions) != len(ground_truths) or (step_maps is not None and len(step_maps) != len(completions)):
            raise ValueError(
                f"got {len(completions)} completions, {len(ground_truths)} ground truths and "
                f"{'no' if step_maps is None else len(step_maps)} step maps; pass one of each per rollout"
            )
        terms = [
            self(c, g, None if step_maps is None else step_maps[i], block_size)
            for i, (c, g) in enumerate(zip(completions, ground_truths))
        ]
        keys = ("correctness", "format", "speed", "total", "tokens_per_step")
        return {k: torch.tensor([getattr(t, k) for t in terms], dtype=torch.float32) for k in keys}

"""Warmup-Stable-Decay block-size schedule (report section 3.1).

The block size is a pure function of the number of consumed training tokens,
so that resuming, changing the batch size or re-running a step always gives
the same block size.  Phases are ``(block_size, amount)`` with amounts in steps
or tokens; the last phase extends to the end of training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..config.choices import field_choices
from ..config.schema import DiffusionConfig
from ..errors import ConfigError

__all__ = ["WSDSchedule", "trained_block_size"]


@dataclass(frozen=True)
class WSDSchedule:
    """Block-size phases; ``tokens_per_step`` converts step amounts into tokens."""

    phases: tuple[tuple[int, int], ...]
    seq_length: int
    unit: str = "steps"
    tokens_per_step: int = 1

    def __post_init__(self) -> None:
        if not self.phases:
            raise ConfigError("diffusion.block_schedule is empty; give at least one [block_size, amount] phase")
        units = field_choices(DiffusionConfig, "block_schedule_unit")
        if self.unit not in units:
            raise ConfigError(f"diffusion.block_schedule_unit must be `{'` or `'.join(units)}`, got `{self.unit}`")
        if self.tokens_per_step < 1:
            raise ConfigError(f"tokens per step must be positive, got {self.tokens_per_step}")
        for i, phase in enumerate(self.phases):
            if len(phase) != 2:
                raise ConfigError(f"diffusion.block_schedule[{i}] = {list(phase)} must be [block_size, amount]")
            bs, amount = phase
            if bs < 1 or bs > self.seq_length or self.seq_length % bs:
                raise ConfigError(
                    f"diffusion.block_schedule[{i}]: block size {bs} does not divide data.seq_length "
                    f"{self.seq_length}; use a divisor of {self.seq_length} (the full length {self.seq_length} "
                    "gives the MDLM phase)"
                )
            if amount < 1:
                raise ConfigError(f"diffusion.block_schedule[{i}]: phase length {amount} must be >= 1 {self.unit}")

    @classmethod
    def from_config(cls, phases: Sequence[Sequence[int]], seq_length: int, unit: str, tokens_per_step: int):
        return cls(tuple(tuple(int(x) for x in p) for p in phases), seq_length, unit, tokens_per_step)

    @classmethod
    def of_run(cls, cfg: Any) -> "WSDSchedule":
        """The schedule of a run config (``diffusion.block_schedule`` / ``block_schedule_unit``,
        ``data.seq_length``; a step consumes ``train.global_batch_size`` sequences)."""
        L = cfg.data.seq_length
        return cls.from_config(cfg.diffusion.block_schedule, L, cfg.diffusion.block_schedule_unit,
                               cfg.train.global_batch_size * L)

    def _token_bounds(self) -> list[int]:
        scale = self.tokens_per_step if self.unit == "steps" else 1
        bounds, end = [], 0
        for _, amount in self.phases:
            end += amount * scale
            bounds.append(end)
        return bounds

    def phase_index(self, consumed_tokens: int) -> int:
        for i, end in enumerate(self._token_bounds()):
            if consumed_tokens < end:
                return i
        return len(self.phases) - 1

    def block_size(self, consumed_tokens: int) -> int:
        """Block size to use for the step that starts after ``consumed_tokens`` tokens."""
        return self.phases[self.phase_index(consumed_tokens)][0]

    def trained_block_size(self, consumed_tokens: Optional[int]) -> int:
        """The block size a checkpoint that consumed ``consumed_tokens`` was trained with: the phase in force
        during its last step (a run stopped mid-schedule is not at its last phase).  ``None`` (a converted or
        merged checkpoint without a token count): the last phase."""
        if consumed_tokens is None:
            return self.phases[-1][0]
        return self.block_size(max(int(consumed_tokens) - self.tokens_per_step, 0))

    def state_dict(self) -> dict:
        return {"phases": [list(p) for p in self.phases], "unit": self.unit, "seq_length": self.seq_length,
                "tokens_per_step": self.tokens_per_step}

    def check_state(self, state: dict) -> list[str]:
        """Differences between a checkpoint's schedule and this one (resuming a changed schedule is allowed
        but logged, because the block size is recomputed from consumed tokens)."""
        mine = self.state_dict()
        return [f"{k}: checkpoint {state.get(k)!r} -> now {mine[k]!r}" for k in mine if state.get(k) != mine[k]]


def trained_block_size(cfg: Any, consumed_tokens: Optional[int]) -> int:
    """The single definition of "the block size this checkpoint was trained with", from its resolved
    config (see :meth:`WSDSchedule.of_run`) and its consumed-token count (``metrics.json``); every stage
    (``init_from``) and tool (``generate``, ``eval``) uses it."""
    return WSDSchedule.of_run(cfg).trained_block_size(consumed_tokens)

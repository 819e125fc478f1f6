"""The stage contract: every hook the training loop calls on a stage, each with its default.

A stage (CPT, SFT, DPO, RL) varies the data and the step, not the loop
(:mod:`llada_cpt.training.loop`).  Per optimizer step the loop calls
:meth:`Stage.step_data`, then :meth:`Stage.before_step` (forward-only passes
whose results the step needs: DPO's reference ELBOs, RL's old / reference
log-probs, SFT-CAP's global count of correct tokens), then one Megatron
forward/backward with :meth:`Stage.step_loss`, then :meth:`Stage.after_step`.
Validation is :meth:`Stage.validate`: by default the ELBO over
:meth:`Stage.eval_data`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

from ..config.schema import Config
from ..diffusion.inputs import DiffusionBatch

if TYPE_CHECKING:
    from .loop import Run, StepData
    from .step import StepLoss, StepResult

__all__ = ["Stage"]


class Stage:
    """Base class of the training stages; ``prepare`` and ``step_data`` have no default."""

    name: str = ""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # ---------------------------------------------------------------- set-up

    def resolve_config(self, cfg: Config) -> None:
        """Write the values the stage takes from elsewhere (``train.init_from``: SFT / DPO block size, DPO
        learning rate) into ``cfg`` before it is validated and saved.  Default: nothing."""

    def prepare(self, cfg: Config) -> tuple[int, int]:
        """Load tokenizer / data (``cfg`` is final by now); return ``(vocab_size, mask_id)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data

    def step_data(self, run: "Run", block_size: int) -> "StepData":
        """This rank's micro-batches of the next optimizer step."""
        raise NotImplementedError

    def eval_data(self, run: "Run", block_size: int) -> List[List[DiffusionBatch]]:
        """The fixed validation steps (each a list of micro-batches) of :meth:`validate`.  Default: none."""
        return []

    # ------------------------------------------------------------------ step

    def before_step(self, run: "Run", batches: List[DiffusionBatch], forward_only: bool) -> None:
        """Attach what the pass needs to ``batches`` (reference / old log-probs, global counts).  Default: nothing."""

    def step_loss(self, run: "Run", batches: List[DiffusionBatch]) -> "StepLoss":
        """The loss of the pass (called after :meth:`before_step`).  Default: the ELBO."""
        from .step import ELBO_LOSS

        return ELBO_LOSS

    def after_step(self, run: "Run", result: "StepResult") -> "StepResult":
        """Add the stage's own values to the step's result (RL: rollout metrics).  Default: unchanged."""
        return result

    # ------------------------------------------------------------ validation

    def validate(self, run: "Run", block_size: int) -> Dict[str, float]:
        """Validation metrics at ``block_size``.  Default: ELBO loss / perplexity over :meth:`eval_data`, also at
        ``diffusion.reference_block_size`` (:func:`llada_cpt.training.loop.elbo_validation`)."""
        from .loop import elbo_validation

        return elbo_validation(run, self, block_size)

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The stage's resume state (data position), saved with each checkpoint.  Default: empty."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (called after :meth:`prepare`).  Default: nothing."""

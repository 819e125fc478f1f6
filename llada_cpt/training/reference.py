"""A frozen copy of the starting policy: DPO's reference model and RL's reference for the KL term."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch

from ..config.schema import Config
from ..errors import ConfigError

if TYPE_CHECKING:
    from .loop import Run

__all__ = ["build_reference"]


def build_reference(cfg: Config, run: "Run", init_path: Optional[str | os.PathLike]) -> list:
    """Model chunks with the policy's layout on the same ranks, loaded from ``init_path`` (the checkpoint
    ``train.init_from`` names) or, without one, copied from the policy's initial weights; eval mode, no
    gradients.  The RNG streams are left untouched, so building it changes nothing else in the run."""
    from megatron.core import tensor_parallel

    from ..checkpoint import megatron as ckpt
    from ..model.provider import build_model
    from ..model.wrappers import unwrap

    if init_path is None and run.iteration > 0:
        raise ConfigError("a DPO run without train.init_from cannot resume: its reference (the random initial "
                          "weights) is not saved; start from a checkpoint with train.init_from")
    cpu_rng = torch.get_rng_state()
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    try:
        chunks = build_model(cfg.model, cfg.parallel, cfg.train.precision, run.vocab_size)
    finally:
        torch.set_rng_state(cpu_rng)
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
    if init_path is not None:
        ckpt.load_checkpoint(init_path, chunks, restore_rng=False)
    else:
        for ref, policy in zip(chunks, run.model_chunks):
            ref.load_state_dict(unwrap(policy).state_dict())
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks

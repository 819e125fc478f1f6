"""Non-finite loss / gradient guard, decided *before* the optimizer step.

Megatron's optimizers look for inf/NaN only when they own a loss scaler (fp16).
In fp32 and bf16, ``optimizer.step()`` clips with a NaN norm and applies the
update, and only its returned grad norm shows that something went wrong: by
then the weights (and Adam's moments) are NaN.  So the loop checks the reduced
gradients (``param.main_grad``, after Megatron's ``finalize_model_grads``) on
every rank and agrees on the answer with one all-reduce; a bad step never calls
``optimizer.step()``.

Policy for a skipped step (``train.nan_policy=skip``): no parameter or optimizer
update, but the step counts: its batch is consumed (it is not retried, the
logged data indices say which samples it held), and the LR scheduler and the
WSD block size move on as usual, so a run with skips follows the same LR and
block-size schedule as one without.  ``stop`` raises :class:`TrainingDiverged`
before anything is saved, so ``latest`` keeps naming the last good checkpoint.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence

import torch
import torch.distributed as dist

from ..errors import UserError
from .distributed import all_reduce_host

__all__ = ["TrainingDiverged", "grads_finite", "global_data_indices", "describe_indices"]


class TrainingDiverged(UserError, FloatingPointError):
    """Non-finite loss or gradients with ``train.nan_policy=stop`` (reported as one line, exit code 2)."""


def _main_grads(model_chunks: Iterable[torch.nn.Module]) -> List[torch.Tensor]:
    grads = []
    for chunk in model_chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if p.requires_grad and g is not None:
                grads.append(g)
    return grads


def grads_finite(model_chunks: Sequence[torch.nn.Module]) -> bool:
    """Collective over the world: True when no rank holds a non-finite gradient element.

    A NaN on one rank reaches the other ranks' shards only through the
    reduction, so every rank checks its own buffers and the flags are
    max-reduced; every rank then takes the same decision.
    """
    grads = _main_grads(model_chunks)
    device = grads[0].device if grads else torch.device("cpu")
    bad = torch.zeros(1, dtype=torch.int32, device=device)
    for g in grads:  # one parameter at a time: no full-size temporary
        bad |= (~torch.isfinite(g).all()).to(torch.int32)
    return not bool(all_reduce_host(bad, dist.ReduceOp.MAX).item())


def global_data_indices(local: Sequence[int]) -> List[int]:
    """Collective: the sorted data indices of the whole global batch (all DP ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sorted(set(int(i) for i in local))
    gathered: List[List[int]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, [int(i) for i in local])
    return sorted({i for part in gathered for i in part})


def describe_indices(indices: Sequence[int], limit: int = 64) -> str:
    """``[3, 17, ...]`` with at most ``limit`` entries and the total when cut."""
    shown = ", ".join(str(i) for i in indices[:limit])
    more = f", ... ({len(indices)} in all)" if len(indices) > limit else ""
    return f"[{shown}{more}]"

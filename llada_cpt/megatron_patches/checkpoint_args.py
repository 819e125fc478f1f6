"""Activation recomputation with a non-tensor ``attention_mask`` (all devices, 0.16-0.19).

Our attention mask is an :class:`~llada_cpt.diffusion.layout.AttentionLayout`
(a description, not a tensor).  Megatron's ``CheckpointFunction`` (full and
selective ``core_attn`` recomputation) stores its arguments with
``ctx.save_for_backward``, which accepts only tensors and ``None``.  The patch
takes other objects out of the argument list before ``forward`` (they are closed
over by the recomputed function, so backward sees the same object) and gives
them a ``None`` gradient slot.  Tensor-only calls take the original path.
"""
from __future__ import annotations

from typing import List

import torch

__all__ = ["apply"]

_APPLIED: List[str] = []


def apply() -> List[str]:
    if _APPLIED:
        return list(_APPLIED)
    from megatron.core.tensor_parallel import random as mrandom

    fn = mrandom.CheckpointFunction
    original = fn.forward

    def forward(ctx, run_function, distribute_saved_activations, *args):
        objects = {i: a for i, a in enumerate(args) if a is not None and not torch.is_tensor(a)}
        if not objects:
            return original(ctx, run_function, distribute_saved_activations, *args)
        tensors = tuple(None if i in objects else a for i, a in enumerate(args))

        def run(*xs):
            return run_function(*(objects.get(i, x) for i, x in enumerate(xs)))

        return original(ctx, run, distribute_saved_activations, *tensors)

    fn.forward = staticmethod(forward)
    _APPLIED.append("checkpoint_non_tensor_args")
    return list(_APPLIED)

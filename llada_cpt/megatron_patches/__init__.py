"""Everything that monkey-patches Megatron-Core, each patch small and documented.

* :mod:`llada_cpt.megatron_patches.cpu`: run on CPU processes with gloo (no CUDA only).
* :mod:`llada_cpt.megatron_patches.te_absent`: defects of installs without Transformer Engine / apex.
* :mod:`llada_cpt.megatron_patches.checkpoint_args`: activation recomputation with our
  non-tensor ``attention_mask`` (the AttentionLayout).
* :mod:`llada_cpt.megatron_patches.moe_aux_loss`: MoE aux-loss gradient scale under CP / sequence parallelism.
* :mod:`llada_cpt.megatron_patches.torch_optimizer`: grad norm and clipping on torch's multi-tensor kernels
  (one host sync) and fused AdamW, where apex / TE are absent.

Targets ``megatron-core>=0.16.1,<0.20``; :func:`apply` returns the names of the
patches applied in this process, for the start-up log.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

__all__ = ["apply", "apply_once"]


def apply_once(patches: Sequence[Callable[[], bool]], applied: List[str]) -> List[str]:
    """Run each patch function not yet in ``applied`` (by name, without the leading ``_``); a
    patch returns whether it applied (False: not needed here).  Returns the applied names."""
    for fn in patches:
        name = fn.__name__.lstrip("_")
        if name not in applied and fn():
            applied.append(name)
    return list(applied)


def apply() -> List[str]:
    """Apply the patches this process needs (idempotent)."""
    from . import checkpoint_args, cpu, moe_aux_loss, te_absent, torch_optimizer

    return (cpu.apply() + te_absent.apply() + checkpoint_args.apply() + moe_aux_loss.apply()
            + torch_optimizer.apply())

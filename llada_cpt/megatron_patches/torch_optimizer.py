"""Megatron-Core's optimizer path without apex / Transformer Engine, on torch's multi-tensor kernels.

Without TE or apex, Megatron-Core (0.16.1 - 0.19, ``optimizer/clip_grads.py`` and
``optimizer/optimizer.py``) falls back to ``megatron.core.utils``'s local stand-ins:

* ``local_multi_tensor_l2_norm``: one ``torch.norm`` per gradient, then
  ``torch.tensor(list_of_norms)`` -- a device-to-host copy *per tensor* (hundreds of
  synchronisations per step on a GPU) -- and back to the device;
* ``local_multi_tensor_scale``: ``dst.copy_(src * scale)`` per tensor (a temporary
  and two kernels per tensor) for gradient clipping and fp32 main-param copies;
* the inner optimizer is ``torch.optim.AdamW`` with torch's default (foreach, not
  fused) implementation.

:func:`apply` rebinds the two stand-ins (only where they are bound, i.e. only without
TE/apex) to ``torch._foreach_norm`` / ``torch._foreach_mul_`` versions that keep
the norm on the device: the one host synchronisation left is the ``.item()`` that
``get_grad_norm_fp32`` does after its all-reduce.  :func:`use_fused_adamw` switches a
built optimizer's torch AdamW to ``fused=True`` (one kernel for all parameters);
the training code calls it on CUDA (``training/optimizer.py``).  The results equal
the stand-ins' up to float rounding (tested: parameters after three steps within
1e-6 relative, clipping on and off, DP=2 with the distributed optimizer and TP=2).
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Sequence

import torch

__all__ = ["apply", "revert", "foreach_l2_norm", "foreach_scale", "inner_torch_optimizers", "use_fused_adamw"]

_ORIGINALS: List[tuple] = []  # (module, name, original value) of every rebinding, for revert()


def foreach_l2_norm(chunk_size: int, noop_flag, tensor_lists: Sequence[Sequence[torch.Tensor]], per_tensor: bool,
                    *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm``: the global L2 norm as a ``[1]`` fp32 tensor on the device."""
    tensors = [t for tensors in tensor_lists for t in tensors]
    norms = torch._foreach_norm(tensors, 2.0)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)
    return total.reshape(1), None


def foreach_scale(chunk_size: int, noop_flag, tensor_lists: Sequence[Sequence[torch.Tensor]], scale: float) -> None:
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` for all tensors at once."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if not dst:
        return
    if scale == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _rebind(module, name: str, local: Callable, replacement: Callable) -> bool:
    """Replace ``module.name`` by ``replacement`` where it is Megatron's local stand-in ``local``."""
    if getattr(module, name, None) is not local:
        return False  # TE / apex kernels (or someone else's replacement): leave them
    _ORIGINALS.append((module, name, local))
    setattr(module, name, replacement)
    return True


def _foreach_grad_norm() -> bool:
    """``clip_grads.l2_norm_impl`` (0.16.1 - 0.19): per-tensor norms with a host copy each -> ``_foreach_norm``."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    return _rebind(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm, foreach_l2_norm)


def _foreach_grad_scale() -> bool:
    """``multi_tensor_scale_impl`` of ``clip_grads`` (clipping) and ``optimizer`` (fp32 copies), 0.16.1 - 0.19."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    done = [_rebind(m, "multi_tensor_scale_impl", utils.local_multi_tensor_scale, foreach_scale)
            for m in (clip_grads, optimizer)]
    return any(done)


_PATCHES = [_foreach_grad_norm, _foreach_grad_scale]
_APPLIED: List[str] = []


def apply() -> List[str]:
    """Apply the rebindings this installation needs (idempotent); their names."""
    from . import apply_once

    return apply_once(_PATCHES, _APPLIED)


def revert() -> None:
    """Restore Megatron's own stand-ins (tests compare both paths in one process)."""
    while _ORIGINALS:
        module, name, original = _ORIGINALS.pop()
        setattr(module, name, original)
    _APPLIED.clear()


def inner_torch_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch ``Adam``/``AdamW`` instances inside a Megatron optimizer (chained or not, stubs skipped)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) in (torch.optim.Adam, torch.optim.AdamW):  # TE/apex FusedAdam: already fused
            yield inner


def _step_on_param_device(opt: torch.optim.Optimizer) -> None:
    """Fused Adam keeps ``step`` as an fp32 tensor on the parameter's device, one per parameter."""
    for group in opt.param_groups:
        for param in group["params"]:
            state = opt.state.get(param)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32).clone()


def _fuse(opt: torch.optim.Optimizer) -> None:
    opt.defaults.update(fused=True, foreach=None)
    for group in opt.param_groups:
        group.update(fused=True, foreach=None)
    opt._step_supports_amp_scaling = True  # what torch's constructor sets for fused=True
    _step_on_param_device(opt)


def _unfuse(opt: torch.optim.Optimizer) -> None:
    opt.defaults.update(fused=None, foreach=None)
    for group in opt.param_groups:
        group.update(fused=None, foreach=None)
        for param in group["params"]:  # non-fused AdamW keeps step on the host (no sync per parameter)
            state = opt.state.get(param)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to("cpu", torch.float32).clone()


def use_fused_adamw(optimizer, enabled: bool = True) -> int:
    """Switch the torch AdamW inside a Megatron optimizer to ``fused=True``; how many were switched.

    ``enabled=False`` switches back to torch's default implementation (the benchmark
    compares both on one optimizer; ``train.fused_adamw=false``).

    Megatron-Core constructs ``torch.optim.AdamW(**kwargs)`` itself without a ``fused``
    argument (0.16.1 - 0.19, ``_get_megatron_optimizer_based_on_param_groups``), so the
    flag is set on the built instance.  A checkpoint load replaces the param groups
    with the saved ones (which may say ``fused=False``, e.g. from a CPU run) and may
    leave ``step`` on the host: a load hook sets both again.  Either way the choice
    survives a resume: a checkpoint saved fused loads unfused when ``enabled=False``.
    """
    count = 0
    for opt in inner_torch_optimizers(optimizer):
        hooked = getattr(opt, "_llada_fused_hook", None)
        if hooked is not None:
            hooked.remove()
            opt._llada_fused_hook = None
        choose = _fuse if enabled else _unfuse
        choose(opt)
        opt._llada_fused_hook = opt.register_load_state_dict_post_hook(choose)
        count += 1
    return count

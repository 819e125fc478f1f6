"""Fixes for Megatron-Core installs without Transformer Engine / apex (CPU, and GPU without TE).

Each patch checks for the condition it fixes, so it is a no-op where it is not
needed.  Targets megatron-core 0.16.1 - 0.19.
"""
from __future__ import annotations

from typing import List

__all__ = ["apply"]


def _moe_router_gemm_name() -> bool:
    """megatron-core 0.16.x: ``moe_utils.te_general_gemm`` is undefined without TE.

    ``RouterGatingLinearFunction`` tests ``te_general_gemm is not None`` but the name
    is only bound inside the TE import ``try`` block, so every MoE router raises
    ``NameError``.  0.17+ binds it to ``None``; we do the same.
    """
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


def _torch_adam_step_state() -> bool:
    """Distributed optimizer + torch Adam (no apex/TE FusedAdam): per-parameter ``step`` (0.16-0.19).

    Without apex/TE, Megatron falls back to ``torch.optim.AdamW``, which keeps a
    ``step`` tensor per parameter.  Two defects follow on checkpoint load:
    ``load_state_dict`` gives every parameter the *same* ``step`` tensor, which
    AdamW increments in place once per parameter (bias correction then drifts and
    resumed runs diverge from unbroken ones); and the ``fully_reshardable`` loader
    drops ``step`` from the loaded tensors while ``_set_main_param_and_optimizer_states``
    still copies every state key, raising ``KeyError: 'step'``.  Also a fresh
    optimizer has no state yet, so building the state-dict template to load into
    fails (``state_dict`` asserts one common ``step``), and so does saving before the
    first update.  We create zero Adam state
    (own ``step`` per parameter) for that template, keep the current value for keys
    missing from the loaded shard and give each parameter its own ``step`` after
    loading.
    """
    import torch
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return False
    cls = distrib_optimizer.DistributedOptimizer
    set_states = cls._set_main_param_and_optimizer_states
    load_state_dict = cls.load_state_dict
    sharded_state_dict = cls.sharded_state_dict

    def sharded_state_dict_with_state(self, model_sharded_state_dict={}, is_loading=False, *args, **kwargs):
        # loading: a template to load into; saving before the first step (e.g. every RL batch skipped):
        # ``state_dict`` would assert on the empty state.  Zero moments with step 0 are exactly what
        # AdamW creates lazily at its first step, so this changes no update.
        fresh = not any(self.optimizer.state.values())
        if (is_loading or fresh) and isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    state = self.optimizer.state[param]
                    if not state:  # fused AdamW (torch_optimizer.use_fused_adamw) keeps step on the device
                        fused = group.get("fused")
                        state["step"] = torch.tensor(0.0, device=param.device if fused else None)
                        state["exp_avg"] = torch.zeros_like(param)
                        state["exp_avg_sq"] = torch.zeros_like(param)
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            tensors = {**self.optimizer.state[main_param], **tensors}
        return set_states(self, model_param, tensors)

    def load_state_dict_with_own_steps(self, state_dict):
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict_with_own_steps
    cls.sharded_state_dict = sharded_state_dict_with_state
    return True


_PATCHES = [_moe_router_gemm_name, _torch_adam_step_state]
_APPLIED: List[str] = []


def apply() -> List[str]:
    """Apply the fixes this installation needs (idempotent); their names."""
    from . import apply_once

    return apply_once(_PATCHES, _APPLIED)

"""Optimizer checkpoints that load across expert-parallel sizes (EP = 2 -> EP = 1 and back).

Megatron builds *one* optimizer for an MoE model with EP = 1 (its experts are
ordinary data-parallel parameters) but a ``ChainedOptimizer`` of two with EP > 1
(dense parameters, then expert-parallel ones, reduced over different groups).
Its own ``sharded_state_dict`` mirrors that structure: with EP > 1 the tensors
get a ``chained_<i>.`` key prefix and the non-tensor part (param groups, step)
is a ``{0: ..., 1: ...}`` dict, so an EP = 2 checkpoint cannot be loaded with
EP = 1 or vice versa (``KeyError`` in the load plan, then in ``load_state_dict``).

Here every part of the chain is saved under its *role* - ``dense`` or
``expert`` - with the un-prefixed tensor keys of the ``fully_reshardable``
format (``chained_optim_avoid_prefix``), which name the parameter, not the
chain position.  Loading therefore finds every tensor whatever the chain looks
like now; the non-tensor part of a role the checkpoint lacks (loading EP = 1
into EP > 1) is the dense one's, with the expert flag of its param groups set
(both parts share step and hyper-parameters; Megatron keeps their steps in sync).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List

__all__ = ["OPTIM_METADATA", "optimizer_parts", "optimizer_role", "optimizer_sharded_state_dict",
           "load_optimizer_state"]

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
"""Sharding metadata for saving *and* loading (also stored as the checkpoint's content metadata)."""


def optimizer_parts(optimizer: Any) -> List[Any]:
    """The optimizers of a ``ChainedOptimizer`` (or ``[optimizer]``)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def optimizer_role(part: Any) -> str:
    """``expert`` when all param groups of ``part`` hold expert-parallel parameters, else ``dense``."""
    groups = getattr(getattr(part, "optimizer", None), "param_groups", None) or []
    return "expert" if groups and all(g.get("is_expert_parallel", False) for g in groups) else "dense"


def _roles(optimizer: Any) -> Dict[str, Any]:
    parts = optimizer_parts(optimizer)
    roles = [optimizer_role(p) for p in parts]
    if len(set(roles)) != len(roles) or "dense" not in roles:
        raise ValueError(
            f"cannot checkpoint an optimizer chain with parts {roles}: expected one dense part and at most "
            "one expert-parallel part (parameter-group overrides that split them further are not supported)"
        )
    return dict(zip(roles, parts))


def optimizer_sharded_state_dict(optimizer: Any, model_sharded_state_dict: dict, is_loading: bool) -> dict:
    """``{role: sharded state dict}`` of ``optimizer`` for ``dist_checkpointing.save`` / ``load``."""
    parts = _roles(optimizer)
    if len(parts) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()  # what ChainedOptimizer.sharded_state_dict does first
    return {
        role: part.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=dict(OPTIM_METADATA))
        for role, part in parts.items()
    }


def _as_role(dense_state: dict, role: str, own: dict) -> dict:
    """``dense_state``'s non-tensor part for ``role``, keeping the role's own loaded tensors (``own``)."""
    state = {k: copy.deepcopy(v) for k, v in dense_state.items() if k not in own}
    for group in state.get("optimizer", {}).get("param_groups", []):
        group["is_expert_parallel"] = role == "expert"
    return {**state, **own}


def load_optimizer_state(optimizer: Any, loaded: dict) -> None:
    """Load the ``optimizer`` entry that ``dist_checkpointing.load`` returned for
    :func:`optimizer_sharded_state_dict` (``is_loading=True``), whatever EP saved it."""
    parts = _roles(optimizer)
    if "dense" not in loaded or "optimizer" not in loaded["dense"]:
        raise ValueError("the checkpoint's optimizer state has no `dense` part; it was not saved with "
                         "llada_cpt.checkpoint.optimizer_state (load the weights only, without the optimizer)")
    states = []
    for role in parts:
        state = dict(loaded.get(role) or {})
        if "optimizer" not in state:  # saved without this role: EP = 1 checkpoint, EP > 1 now
            state = _as_role(loaded["dense"], role, state)
        states.append(state)
    optimizer.load_state_dict(states[0] if len(states) == 1 else states)

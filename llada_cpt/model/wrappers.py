"""The bare model under its training wrappers.

Checkpointing, the loss step, inference and conversion all need the ``GPTModel``
itself (its state dict, hooks, output layer), not Megatron's DDP / Float16Module
wrappers; this is the one helper for that, below both ``training`` and
``checkpoint`` so neither has to import the other for it.
"""
from __future__ import annotations

import torch

__all__ = ["unwrap"]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare ``GPTModel`` under DDP / Float16Module wrappers (for state dicts, hooks)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module

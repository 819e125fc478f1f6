"""Attention backends for the block-diffusion mask, and their benchmark.

``reference`` (PyTorch SDPA on the dense mask: the gold every other backend is
tested against) runs everywhere.
``flex`` (FlexAttention BlockMask: skips empty tiles), ``cudnn`` (cuDNN fused
attention through SDPA with an additive bias broadcast over heads) and ``te``
(TransformerEngine with ``post_scale_bias``, or its unfused ``arbitrary`` mask).
All share the contract of ``llada_cpt.attention.core``:
``fn(q [b, hq, Sq, d], k [b, hkv, Sk, d], v, layout, softmax_scale) -> [b, hq, Sq, d]``.

Nothing heavy is imported here: ``llada_cpt.kernels.registry`` resolves names (and
``auto``), checks that the backend can train on this device and imports its
module on first use; ``llada_cpt.attention.core.resolve_backend`` delegates to it.
"""
from __future__ import annotations

from typing import Callable, Dict, MutableMapping

__all__ = ["register_backends"]


def register_backends(registry: MutableMapping[str, Callable]) -> Dict[str, Callable]:
    """Add the fused backends that can train on this machine to ``registry`` (name -> callable)."""
    from .registry import register_backends as _register

    return _register(registry)

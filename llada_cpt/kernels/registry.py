"""Backend names -> callables, availability with the fix, and the ``auto`` choice.

Every backend is ``fn(q, k, v, layout, softmax_scale) -> out`` with ``q``
``[b, hq, Sq, d]``, ``k``/``v`` ``[b, hkv, Sk, d]`` (the contract of
``llada_cpt.attention.core``).  ``auto`` takes the first backend of
:data:`AUTO_ORDER` that can train on the current device; on CPU that is always
``reference``.  The default order is the expected one, not yet a measurement:
FlexAttention skips the empty tiles of the BDLM mask (most of them at B = 32),
cuDNN computes every tile with an additive bias, TE adds its own dispatch on
top of cuDNN.  ``kernels/bench_attention.py`` prints the measured order; set it
with ``LLADA_ATTENTION_AUTO_ORDER=cudnn,flex,te,reference`` when your GPU disagrees.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable, Dict, MutableMapping, Optional, Tuple, get_args

import torch

from llada_cpt.config.schema import AttentionBackend
from llada_cpt.errors import ConfigError

__all__ = [
    "FUSED",
    "NAMES",
    "AUTO_ORDER",
    "auto_order",
    "unavailable_reason",
    "load",
    "auto_choice",
    "resolve",
    "register_backends",
]

log = logging.getLogger(__name__)

NAMES = get_args(AttentionBackend)  # model.attention_backend's Literal: the one list of names
FUSED = tuple(n for n in NAMES if n not in ("reference", "auto"))
AUTO_ORDER = ("flex", "cudnn", "te", "reference")
_BACKEND_ATTR = {"flex": "flex_attention_backend", "cudnn": "cudnn_attention_backend", "te": "te_attention_backend"}
_LOGGED: set = set()


def auto_order() -> Tuple[str, ...]:
    """:data:`AUTO_ORDER`, or ``LLADA_ATTENTION_AUTO_ORDER`` (comma-separated) when set."""
    raw = os.environ.get("LLADA_ATTENTION_AUTO_ORDER")
    if not raw:
        return AUTO_ORDER
    order = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = [n for n in order if n not in NAMES or n == "auto"]
    if unknown:
        raise ConfigError(
            f"LLADA_ATTENTION_AUTO_ORDER names unknown backends {unknown}; use a comma-separated "
            f"list of {', '.join(n for n in NAMES if n != 'auto')}"
        )
    return order + (() if "reference" in order else ("reference",))


def _device(device: Optional[torch.device]) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why backend ``name`` cannot train on ``device``, naming the fix; None when it can."""
    if name == "reference":
        return None
    if name not in FUSED:
        raise ConfigError(f"unknown attention backend `{name}`; use one of {', '.join(NAMES)}")
    module = importlib.import_module(f"llada_cpt.kernels.{name}")
    return module.unavailable_reason(_device(device))


def load(name: str) -> Callable:
    """The callable of backend ``name`` (imported on first use; no availability check)."""
    if name == "reference":
        from .reference import reference_attention

        return reference_attention
    if name not in FUSED:
        raise ConfigError(f"unknown attention backend `{name}`; use one of {', '.join(NAMES)}")
    return getattr(importlib.import_module(f"llada_cpt.kernels.{name}"), _BACKEND_ATTR[name])


def auto_choice(device: Optional[torch.device] = None) -> str:
    """The backend ``auto`` means on ``device``: first trainable one of :func:`auto_order`; logged once."""
    device = _device(device)
    skipped = []
    choice = "reference"
    if device.type == "cuda":
        for name in auto_order():
            reason = unavailable_reason(name, device)
            if reason is None:
                choice = name
                break
            skipped.append(f"{name}: {reason}")
    key = (str(device), choice)
    if key not in _LOGGED:
        _LOGGED.add(key)
        detail = f" (skipped {'; '.join(skipped)})" if skipped else ""
        log.info("attention backend auto -> %s on %s%s", choice, device, detail)
    return choice


def resolve(name: str, registry: Optional[MutableMapping[str, Callable]] = None,
            device: Optional[torch.device] = None) -> Callable:
    """The callable for ``name`` (``auto`` resolved), checked to run on ``device``.

    Raises :class:`ConfigError` with the fix when it cannot; adds it to
    ``registry`` (the attention module's name -> callable dict) when given.
    """
    if name == "auto":
        name = auto_choice(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ConfigError(f"attention backend `{name}` cannot run here: {reason}")
    fn = load(name)
    if registry is not None:
        registry[name] = fn
    return fn


def register_backends(
    registry: MutableMapping[str, Callable], device: Optional[torch.device] = None
) -> Dict[str, Callable]:
    """Add every fused backend that can train on ``device`` to ``registry``; returns those added."""
    added = {}
    for name in FUSED:
        if unavailable_reason(name, device) is None:
            registry[name] = added[name] = load(name)
    return added

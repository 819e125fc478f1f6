"""A small LRU of per-layout mask structures (BlockMask, additive bias), shared by the layers of a step.

Every attention layer of a forward receives the *same* :class:`AttentionLayout`, so
the mask form a backend derives from it (a FlexAttention ``BlockMask``, a cuDNN
additive bias) is built once per micro-batch and reused by the other layers and
by activation recomputation.  The key must be cheap (no device sync, no hashing
of ``doc_ids``) and must never return a stale entry: it holds the identity of
the ``doc_ids`` / ``local_positions`` tensors (``id``, ``data_ptr``, in-place
version counter) and a weak reference that proves the very same tensor objects
are still alive, so an address reused by the caching allocator for the next
step's tensor is a miss, not a false hit.  Content-equal layouts made of
different tensors are a (harmless) miss.
"""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Tuple

import torch

from llada_cpt.diffusion.layout import AttentionLayout

__all__ = ["LayoutCache", "layout_key", "default_cache_size"]


def default_cache_size(fallback: int = 4) -> int:
    """Entries kept per cache (``LLADA_ATTENTION_MASK_CACHE`` overrides); a few micro-batches' worth."""
    raw = os.environ.get("LLADA_ATTENTION_MASK_CACHE")
    if raw is None:
        return fallback
    try:
        size = int(raw)
    except ValueError:
        size = -1
    if size < 1:
        raise ValueError(f"LLADA_ATTENTION_MASK_CACHE={raw!r} must be a positive integer (entries per cache)")
    return size


def _tensor_key(t: Optional[torch.Tensor]) -> Hashable:
    if t is None:
        return None
    return (id(t), t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device))


def layout_key(layout: AttentionLayout) -> Tuple[Hashable, ...]:
    """Identity of a layout: its tensors (by object and version) and its scalar fields."""
    return (
        _tensor_key(layout.doc_ids),
        _tensor_key(layout.local_positions),
        int(layout.block_size),
        bool(layout.mdlm),
        bool(layout.causal),
    )


@dataclass
class _Entry:
    doc_ref: "weakref.ReferenceType[torch.Tensor]"
    pos_ref: Optional["weakref.ReferenceType[torch.Tensor]"]
    value: Any

    def alive(self) -> bool:
        return self.doc_ref() is not None and (self.pos_ref is None or self.pos_ref() is not None)

    def holds(self, layout: AttentionLayout) -> bool:
        pos_ok = (self.pos_ref is None and layout.local_positions is None) or (
            self.pos_ref is not None and self.pos_ref() is layout.local_positions
        )
        return self.doc_ref() is layout.doc_ids and pos_ok


class LayoutCache:
    """``get(layout, extra, build)``: the cached value for (layout identity, extra) or ``build()``.

    ``extra`` carries what else the value depends on (device, dtype, lengths, tile).
    Entries whose tensors died are dropped on every call, so a finished step's
    masks do not outlive it by more than one call.
    """

    def __init__(self, maxsize: Optional[int] = None):
        self.maxsize = maxsize or default_cache_size()
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

    def _purge(self) -> None:
        for key in [k for k, e in self._entries.items() if not e.alive()]:
            del self._entries[key]

    def get(self, layout: AttentionLayout, extra: Tuple[Hashable, ...], build: Callable[[], Any]) -> Any:
        self._purge()
        key = layout_key(layout) + tuple(extra)
        entry = self._entries.get(key)
        if entry is not None and entry.holds(layout):
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.value
        self.misses += 1
        value = build()
        pos = layout.local_positions
        self._entries[key] = _Entry(weakref.ref(layout.doc_ids), None if pos is None else weakref.ref(pos), value)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return value

"""Key/value cache of committed blocks for block-diffusion generation.

Why a cache is exact here: in the ``[x_t ; x_0]`` training layout a query of
``x_t`` block ``k`` sees ``x_t`` block ``k`` and the *clean* copies of blocks
``< k``; a clean block ``j`` itself sees clean blocks ``<= j`` (block-causal).
So the keys/values of a committed block never change once the block is clean,
and the current block only needs them plus its own keys.  Each forward of the
sampler therefore feeds ``[clean blocks not yet cached ; current block]`` and
attends with one rule for every token: *a query sees a key iff the key is a
real token and ``block(key) <= block(query)``* -- the ``x_0`` rule for the
clean part, the ``x_t`` rule for the current block.  After the forward the
keys/values of the clean part are appended to the cache (the current block's
are dropped: they change at every step).

The cache rides through Megatron's ``GPTModel.forward`` in ``attention_mask``
(like :class:`~llada_cpt.diffusion.layout.AttentionLayout` in training);
:class:`~llada_cpt.attention.core.BlockDiffusionAttention` hands the call to
:meth:`KVCache.cached_attention`, which applies RoPE with this forward's
positions, reads and extends the layer's buffers and runs attention.  One
buffer per attention module (i.e. per layer and per TP rank: it holds this
rank's heads), preallocated for the whole batch length.  ``capacity=0`` is the
recomputation mode used as the reference: nothing is stored, every forward
feeds the whole prefix.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..attention.rope import apply_rotary, rotary_cos_sin

__all__ = ["KVCache"]


class KVCache:
    """Per-layer keys/values (after RoPE) of a batch's committed tokens, and the plan of the next forward.

    Batch coordinates: every row has the same length ``capacity`` and block
    boundaries at multiples of the block size (the sampler left-pads by whole
    blocks); ``valid`` marks real tokens (padding is never attended to).
    """

    def __init__(self, batch_size: int, capacity: int, device: torch.device | str = "cpu"):
        self.capacity = int(capacity)
        self.length = 0  # cached positions [0, length) of every row
        self.valid = torch.zeros(batch_size, self.capacity, dtype=torch.bool, device=device)
        self._layers: Dict[torch.nn.Module, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._positions: Optional[torch.Tensor] = None
        self._mask: Optional[torch.Tensor] = None
        self._cur_valid: Optional[torch.Tensor] = None
        self._write = 0

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def plan(self, positions: torch.Tensor, blocks: torch.Tensor, valid: torch.Tensor, write: int) -> None:
        """Describe the next forward: ``n`` tokens per row following the cached ones.

        ``positions`` ``[b, n]``: RoPE positions (document-relative); ``blocks``
        ``[n]``: block index of each token (batch coordinates, non-decreasing);
        ``valid`` ``[b, n]``: real tokens; ``write``: the first ``write`` tokens
        are clean and are appended to the cache after this forward.
        """
        b, n = valid.shape
        if b != self.batch_size or positions.shape != (b, n) or blocks.shape != (n,):
            raise ValueError(f"cache plan shapes: positions {tuple(positions.shape)}, blocks {tuple(blocks.shape)}, "
                             f"valid {tuple(valid.shape)} for a cache of {self.batch_size} rows")
        if write < 0 or write > n or self.length + write > self.capacity:
            raise ValueError(f"cannot append {write} of {n} tokens to a cache holding {self.length} of "
                             f"{self.capacity} positions")
        dev = self.valid.device
        valid = valid.to(dev)
        blocks = blocks.to(dev)
        current = valid.unsqueeze(1) & (blocks.view(1, 1, n) <= blocks.view(1, n, 1))  # [b, q, k]
        # every query sees itself: a padding query would otherwise have no key (NaN rows)
        current |= torch.eye(n, dtype=torch.bool, device=dev)
        cached = self.valid[:, : self.length].unsqueeze(1).expand(b, n, self.length)
        self._mask = torch.cat([cached, current], dim=-1).unsqueeze(1)  # [b, 1, n, length + n]
        self._positions = positions
        self._cur_valid = valid
        self._write = int(write)

    def finish(self) -> None:
        """After the forward: the clean tokens of the plan become cached positions."""
        if self._mask is None:
            raise RuntimeError("KVCache.finish() without a planned forward")
        w = self._write
        if w:
            self.valid[:, self.length:self.length + w] = self._cur_valid[:, :w]
            self.length += w
        self._mask = self._positions = self._cur_valid = None
        self._write = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (finished sequences leave the batch)."""
        rows = rows.to(self.valid.device)
        self.valid = self.valid.index_select(0, rows)
        self._layers = {m: (k.index_select(0, rows.to(k.device)), v.index_select(0, rows.to(v.device)))
                        for m, (k, v) in self._layers.items()}

    def cached_attention(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Core attention of ``module`` (a ``BlockDiffusionAttention``) for the planned forward.

        ``query`` ``[n, b, hq, d]``, ``key``/``value`` ``[n, b, hkv, d]`` (before RoPE);
        returns ``[n, b, hq * d]`` like the module's own forward.
        """
        if self._mask is None:
            raise RuntimeError("KVCache used as attention_mask without KVCache.plan() for this forward")
        n, b = query.shape[0], query.shape[1]
        cos, sin = rotary_cos_sin(self._positions.to(query.device), module.head_dim, module.rotary_base,
                                  module.rotary_scaling)
        q = apply_rotary(query, cos, sin).permute(1, 2, 0, 3)  # [b, hq, n, d]
        k = apply_rotary(key, cos, sin).permute(1, 2, 0, 3)  # [b, hkv, n, d]
        v = value.permute(1, 2, 0, 3)
        if self.length or self._write:
            ck, cv = self._buffers(module, k, v)
            start, w = self.length, self._write
            ck[:, :, start:start + w] = k[:, :, :w]  # read below only up to `start`
            cv[:, :, start:start + w] = v[:, :, :w]
            if start:
                k = torch.cat([ck[:, :, :start], k], dim=2)
                v = torch.cat([cv[:, :, :start], v], dim=2)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # GQA
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask.to(q.device), scale=module.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(n, b, module.hidden_size_per_partition)

    def _buffers(self, module, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        buf = self._layers.get(module)
        if buf is None:
            b, h, _, d = k.shape
            buf = (k.new_zeros(b, h, self.capacity, d), v.new_zeros(b, h, self.capacity, v.shape[-1]))
            self._layers[module] = buf
        return buf

"""The mask *description* handed to attention instead of a dense ``[2L, 2L]`` tensor.

Backends build their own form from it: the reference backend densifies it, a
FlexAttention backend turns it into a ``BlockMask``, context parallelism
evaluates it for (local queries, global keys).  It rides through Megatron's
``GPTModel.forward`` in the ``attention_mask`` argument.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .masks import bdlm_allowed, block_index, document_positions

__all__ = ["AttentionLayout"]


@dataclass
class AttentionLayout:
    """Which query may see which key, for one micro-batch.

    ``doc_ids`` is ``[b, L]`` over the *global* sequence.  ``mdlm`` selects the
    single-copy layout (length ``L``, eq. 4 mask); otherwise the model input is
    ``[x_t ; x_0]`` of length ``2L``.  ``causal`` is plain document-causal
    attention over ``L`` tokens (the AR model, used for parity tests and
    conversion checks).  ``local_positions`` (sorted global positions in
    ``[0, L)``) is set under context parallelism: this rank then holds those
    positions of each half, in that order.
    """

    doc_ids: torch.Tensor
    block_size: int
    mdlm: bool = False
    causal: bool = False
    local_positions: Optional[torch.Tensor] = None
    # per-row seeds for the stochastic parts of the forward (masked-embedding noise), derived from
    # each sample's global position so the noise does not depend on the DP / CP / micro-batch split
    row_seeds: Optional[torch.Tensor] = None

    @property
    def seq_length(self) -> int:
        return self.doc_ids.shape[-1]

    @property
    def num_copies(self) -> int:
        return 1 if (self.mdlm or self.causal) else 2

    def with_local_positions(self, positions: Optional[torch.Tensor]) -> "AttentionLayout":
        return replace(self, local_positions=positions)

    def global_index(self, local: bool) -> torch.Tensor:
        """Indices into the full ``num_copies * L`` input of the local (or all) tokens."""
        L = self.seq_length
        dev = self.doc_ids.device
        pos = self.local_positions if (local and self.local_positions is not None) else torch.arange(L, device=dev)
        pos = pos.to(dev)
        if self.num_copies == 1:
            return pos
        return torch.cat([pos, pos + L])

    def position_ids(self, local: bool = True) -> torch.Tensor:
        """RoPE positions ``[b, S]`` (restarting per document, equal in both halves)."""
        pos = document_positions(self.doc_ids)
        idx = self.global_index(local) % self.seq_length
        return pos[:, idx]

    def _attributes(self, index: torch.Tensor):
        L = self.seq_length
        blk = block_index(self.doc_ids, 1 if self.causal else min(self.block_size, L))
        base = index % L
        noised = index < L if self.num_copies == 2 else torch.full_like(index, self.mdlm, dtype=torch.bool)
        return self.doc_ids[:, base], blk[:, base], noised

    def allowed(self, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
        """``[b, len(q), len(k)]`` mask for global indices into the model input."""
        q_doc, q_blk, q_n = self._attributes(q_index)
        k_doc, k_blk, k_n = self._attributes(k_index)
        if self.mdlm:
            return q_doc.unsqueeze(-1) == k_doc.unsqueeze(-2)
        if self.causal:  # x_0 rule with block size 1
            q_n = torch.zeros_like(q_n)
            k_n = torch.zeros_like(k_n)
        return bdlm_allowed(
            q_doc.unsqueeze(-1), q_blk.unsqueeze(-1), q_n.view(1, -1, 1),
            k_doc.unsqueeze(-2), k_blk.unsqueeze(-2), k_n.view(1, 1, -1),
        )

    def dense_mask(self, local_queries: bool = True) -> torch.Tensor:
        """``[b, 1, Sq, Sk]`` boolean mask: local queries against all keys."""
        return self.allowed(self.global_index(local_queries), self.global_index(False)).unsqueeze(1)

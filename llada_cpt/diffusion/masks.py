"""Attention masks of the block-diffusion layout (DESIGN section 2, binding).

Everything here is pure PyTorch so that the reference attention, the fused
kernels, context parallelism, the sampler and the tests evaluate *one*
definition.  Convention: ``True`` means "query may attend key".

Layout: the model input is ``[x_t ; x_0]`` of length ``2L``.  Index ``i < L`` is
in the noised half, ``i >= L`` in the clean half; both halves share positions
and document ids.  Blocks are counted from the start of each token's document:
``b(k) = (k - doc_start(k)) // B``.
"""
from __future__ import annotations

import torch

__all__ = [
    "document_starts",
    "document_positions",
    "block_index",
    "bdlm_allowed",
    "block_diffusion_mask",
    "document_mask",
]


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """Index of the first token of each token's document (documents are contiguous runs)."""
    L = doc_ids.shape[-1]
    idx = torch.arange(L, device=doc_ids.device).expand_as(doc_ids)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    starts = torch.where(new_doc, idx, torch.zeros_like(idx))
    return torch.cummax(starts, dim=-1).values


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 in every document."""
    L = doc_ids.shape[-1]
    idx = torch.arange(L, device=doc_ids.device).expand_as(doc_ids)
    return idx - document_starts(doc_ids)


def block_index(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Document-relative block index ``b(k)`` of every position."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return torch.div(document_positions(doc_ids), block_size, rounding_mode="floor")


def bdlm_allowed(
    q_doc: torch.Tensor,
    q_blk: torch.Tensor,
    q_noised: torch.Tensor,
    k_doc: torch.Tensor,
    k_blk: torch.Tensor,
    k_noised: torch.Tensor,
) -> torch.Tensor:
    """Element-wise rule of the BDLM table; arguments broadcast against each other.

    ``*_noised`` is True for an index in the x_t half.  This is the single
    definition that dense masks, FlexAttention mask_mods and the CP path use.
    """
    same_doc = q_doc == k_doc
    xt_xt = q_noised & k_noised & (q_blk == k_blk)
    xt_x0 = q_noised & ~k_noised & (q_blk > k_blk)
    x0_x0 = ~q_noised & ~k_noised & (q_blk >= k_blk)
    return same_doc & (xt_xt | xt_x0 | x0_x0)


def block_diffusion_mask(doc_ids: torch.Tensor, block_size: int) -> torch.BoolTensor:
    """Dense ``[..., 2L, 2L]`` BDLM mask for ``doc_ids`` of shape ``[..., L]``."""
    L = doc_ids.shape[-1]
    blk = block_index(doc_ids, block_size)
    doc2 = torch.cat([doc_ids, doc_ids], dim=-1)
    blk2 = torch.cat([blk, blk], dim=-1)
    noised = torch.arange(2 * L, device=doc_ids.device) < L
    return bdlm_allowed(
        doc2.unsqueeze(-1), blk2.unsqueeze(-1), noised.unsqueeze(-1),
        doc2.unsqueeze(-2), blk2.unsqueeze(-2), noised.unsqueeze(-2),
    )


def document_mask(doc_ids: torch.Tensor) -> torch.BoolTensor:
    """Dense ``[..., L, L]`` mask of MDLM (report eq. 4): bidirectional within a document."""
    return doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)

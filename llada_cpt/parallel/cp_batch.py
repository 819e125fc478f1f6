"""This context-parallel rank's share of a :class:`~llada_cpt.diffusion.inputs.DiffusionBatch`.

Every CP rank of a data-parallel replica builds the *same* full micro-batch
(same data, same noise seed) and keeps only its positions, so no rank ever
sends tokens to another: the split is pure indexing, done in
``training/step.py`` right before the model call, for every stage.

Megatron does no CP split of its own here: ``GPTModel`` never slices the
sequence (that is Megatron-LM's ``get_batch_on_this_cp_rank``, which we do not
call), its RoPE module is unused (``position_embedding_type="none"``) and its
attention is replaced by ours.  What Megatron does with CP, and we rely on:
the pipeline schedules divide the *global* ``seq_length`` by the CP size for
the P2P shapes; with ``calculate_per_token_loss`` the loss is not scaled by the
CP size, DDP *sums* gradients over the DP x CP group and ``finalize_model_grads``
all-reduces the eligible-token count over DP x CP before dividing by it.  So
each CP rank reports its *local* ``sum(w * CE)`` and *local* eligible count,
and loss and gradients equal the CP = 1 run.
"""
from __future__ import annotations

import dataclasses

import torch

from ..diffusion.inputs import DiffusionBatch
from ..diffusion.layout import AttentionLayout
from .context import cp_partition

__all__ = ["layout_partition", "split_layout", "split_batch"]


def _partition_block_size(layout: AttentionLayout) -> int:
    """The block size whose work ``cp_partition`` balances (MDLM: ``L``; plain causal: 1)."""
    if layout.mdlm:
        return layout.seq_length
    return 1 if layout.causal else layout.block_size


def layout_partition(layout: AttentionLayout, cp_size: int) -> list[torch.LongTensor]:
    """Sorted global positions of every CP rank for ``layout`` (one split for the whole micro-batch).

    The single definition shared by the batch split and the K/V gather
    (:mod:`llada_cpt.parallel.cp_attention`), so both agree on who holds what.
    """
    return cp_partition(layout.doc_ids, _partition_block_size(layout), cp_size)


def split_layout(layout: AttentionLayout, cp_size: int, cp_rank: int) -> AttentionLayout:
    """``layout`` with this rank's ``local_positions`` (global ``doc_ids`` kept)."""
    if layout.local_positions is not None:
        raise ValueError("this layout is already split for context parallelism (local_positions is set); "
                         "split the full micro-batch once")
    return layout.with_local_positions(layout_partition(layout, cp_size)[cp_rank])


def split_batch(batch: DiffusionBatch, cp_size: int, cp_rank: int) -> DiffusionBatch:
    """The tokens of ``batch`` that CP rank ``cp_rank`` of ``cp_size`` computes.

    ``input_ids``/``labels``/``loss_weight`` keep this rank's positions of each
    half (``[x_t local ; x_0 local]``, ``num_copies * L / cp`` tokens);
    ``masked``/``t``/``eligible`` keep its positions of ``[0, L)``, so
    ``num_eligible`` counts this rank's share and the sum over CP ranks is the
    full count.  ``cp_size == 1`` returns ``batch`` unchanged.
    """
    if cp_size == 1:
        return batch
    layout = split_layout(batch.layout, cp_size, cp_rank)
    positions = layout.local_positions.to(batch.input_ids.device)
    tokens = layout.global_index(local=True).to(batch.input_ids.device)
    return dataclasses.replace(
        batch,
        input_ids=batch.input_ids[:, tokens],
        labels=batch.labels[:, tokens],
        loss_weight=batch.loss_weight[:, tokens],
        layout=layout,
        masked=batch.masked[:, positions],
        t=batch.t[:, positions],
        eligible=batch.eligible[:, positions],
    )

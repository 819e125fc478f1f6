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
import torch.distributed as dist

from ..diffusion.inputs import DiffusionBatch
from ..diffusion.layout import AttentionLayout
from .context import cp_partition

__all__ = ["layout_partition", "split_layout", "split_batch", "full_token_values"]


def _partition_block_size(layout: AttentionLayout) -> int:
    """The block size whose tiles ``cp_partition`` balances (MDLM: ``L``; plain causal: 1)."""
    if layout.mdlm:
        return layout.seq_length
    return 1 if layout.causal else layout.block_size


def layout_partition(layout: AttentionLayout, cp_size: int) -> list[torch.LongTensor]:
    """Sorted global positions of every CP rank for ``layout`` (one split for the whole micro-batch).

    The single definition shared by the batch split and the K/V gather
    (:mod:`llada_cpt.parallel.cp_attention`), so both agree on who holds what.
    """
    return cp_partition(layout.doc_ids, _partition_block_size(layout), cp_size, causal=layout.causal)


def split_layout(layout: AttentionLayout, cp_size: int, cp_rank: int) -> AttentionLayout:
    """``layout`` with this rank's ``local_positions`` (global ``doc_ids`` kept)."""
    if layout.local_positions is not None:
        raise ValueError("this layout is already split for context parallelism (local_positions is set); "
                         "split the full micro-batch once")
    return layout.with_local_positions(layout_partition(layout, cp_size)[cp_rank])


def split_batch(batch: DiffusionBatch, cp_size: int, cp_rank: int) -> DiffusionBatch:
    """The tokens of ``batch`` that CP rank ``cp_rank`` of ``cp_size`` computes.

    Every per-token field the batch type declares is cut: ``token_fields``
    (``[b, S]``: ``input_ids``/``labels``/``loss_weight``, RL's targets,
    advantages and log-probs) keep this rank's positions of each half
    (``[x_t local ; x_0 local]``, ``num_copies * L / cp`` tokens);
    ``position_fields`` (``[b, L]``: ``masked``/``t``/``eligible``) keep its
    positions of ``[0, L)``, so ``num_eligible`` counts this rank's share and the
    sum over CP ranks is the full count.  ``cp_size == 1`` returns ``batch``
    unchanged.
    """
    if cp_size == 1:
        return batch
    layout = split_layout(batch.layout, cp_size, cp_rank)
    device = batch.input_ids.device
    S, L = batch.input_ids.shape[1], layout.seq_length
    cut = {}
    for names, index, width in ((type(batch).token_fields, layout.global_index(local=True), S),
                                (type(batch).position_fields, layout.local_positions, L)):
        for name in names:
            value = getattr(batch, name)
            if value is None:
                continue
            if value.shape[1] != width:
                raise ValueError(f"per-token field `{name}` has {value.shape[1]} positions, expected {width}; "
                                 "split the full micro-batch")
            cut[name] = value[:, index.to(device)]
    return dataclasses.replace(batch, layout=layout, **cut)


def full_token_values(values: torch.Tensor, layout: AttentionLayout, cp_group=None) -> torch.Tensor:
    """Per-token ``values`` of this CP rank (``[b, n]``: all its tokens, or their x_t half) placed at their
    global positions of the ``[b, num_copies * L]`` input, zeros elsewhere, and summed over ``cp_group``:
    every CP rank gets the values of the whole micro-batch (e.g. RL's recomputed old log-probs, which the
    training pass splits again like any other per-token field)."""
    index = layout.global_index(local=True).to(values.device)
    if layout.num_copies == 2 and values.shape[1] == index.numel() // 2:
        index = index[: index.numel() // 2]  # the LM head ran on the x_t half
    if values.shape[1] != index.numel():
        raise ValueError(f"{values.shape[1]} values for {index.numel()} local tokens")
    full = values.new_zeros(values.shape[0], layout.num_copies * layout.seq_length)
    full[:, index] = values
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(full, group=cp_group)
    return full

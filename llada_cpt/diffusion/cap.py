"""Confidence-Aware Parallel (CAP) training loss (report section 5.2, eq. 6).

``L = L_SFT + lambda * L_conf``, where ``L_conf`` is the mean entropy of the
predictive distribution over the masked positions whose argmax already equals
the target: it sharpens predictions that are right (so more of them pass the
sampler's confidence threshold) without pushing on wrong ones, which ``L_SFT``
handles.  The selection (argmax == target) is a mask, not differentiated.

Shapes: ``logits[..., V]`` with ``labels[...]`` and ``loss_weight_or_masked[...]``
of the same leading shape, e.g. ``[b, S, V]`` with ``DiffusionBatch.labels`` /
``loss_weight`` (``[b, S]``); Megatron's sequence-first ``[S, b, V]`` output goes
with the transposed labels.  Positions count as masked where the weight is
``> 0`` (or the bool mask is True), so the clean half of the BDLM input never
contributes.

Normalisation follows :mod:`llada_cpt.diffusion.loss`: each micro-batch returns
``(entropy_sum, num_correct)`` and the step sums both over micro-batches and
DP/CP ranks before dividing, so ``L_conf`` is the exact mean over the global
batch (dParallel's definition, which the report's lambda values assume).  A
loop that scales gradients once by the global *eligible* count (Megatron's
per-token path) needs the global correct count before the backward pass: the
SFT stage counts it with :func:`vocab_parallel_correct_count` in a forward-only
pass and weights ``entropy_sum`` by ``eligible / correct``.

Tensor parallelism: with vocab-sharded logits (Megatron's output layer, rank
``r`` of the TP group holds the contiguous vocabulary slice
``[r * V/tp, (r+1) * V/tp)``) use :func:`vocab_parallel_cap_confidence_terms`;
max, log-sum-exp, entropy and argmax are all-reduced over the TP group and the
backward pass needs no communication.  Every TP rank holds the same labels and
mask, so all ranks select the same rows and enter the same collectives.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .loss import normalised_loss

__all__ = [
    "token_entropy",
    "cap_confidence_terms",
    "vocab_parallel_cap_confidence_terms",
    "vocab_parallel_correct_count",
    "cap_loss",
]


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


class _Entropy(torch.autograd.Function):
    """Row entropy of softmax(x) over a vocabulary that may be split across ``group``.

    Backward uses ``dH/dx_j = -p_j (log p_j + H)``, whose global quantities
    (``log Z`` inside ``log p``, and ``H``) are already known from the forward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x if x.dtype == torch.float64 else x.float()
        row_max = _all_reduce(x.max(dim=-1).values, dist.ReduceOp.MAX, group)
        shifted = x - row_max.unsqueeze(-1)
        log_z = _all_reduce(shifted.exp().sum(dim=-1), dist.ReduceOp.SUM, group).log()
        log_p = shifted - log_z.unsqueeze(-1)
        p = log_p.exp()
        entropy = -_all_reduce((p * log_p).sum(dim=-1), dist.ReduceOp.SUM, group)
        ctx.save_for_backward(p, log_p, entropy)
        return entropy

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, log_p, entropy = ctx.saved_tensors
        return -grad.unsqueeze(-1) * p * (log_p + entropy.unsqueeze(-1)), None


def token_entropy(logits: torch.Tensor, group=None) -> torch.Tensor:
    """Entropy (nats, float32 or float64) of ``softmax(logits)`` per row; vocab split over ``group`` if given."""
    return _Entropy.apply(logits, group)


def _masked_rows(
    logits: torch.Tensor, labels: torch.Tensor, loss_weight_or_masked: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    if logits.shape[:-1] != labels.shape or labels.shape != loss_weight_or_masked.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} + [V] and the mask "
            f"{tuple(loss_weight_or_masked.shape)} must match labels"
        )
    m = loss_weight_or_masked
    masked = m if m.dtype == torch.bool else m > 0
    return logits[masked], labels[masked]


def _terms(rows: torch.Tensor, correct: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor]:
    count = correct.sum().to(torch.float32)
    chosen = rows[correct]
    if chosen.shape[0] == 0:  # keep the graph connected; same on every TP rank
        return (rows.sum() * 0.0).float(), count
    return token_entropy(chosen, group).sum(), count


def cap_confidence_terms(
    logits: torch.Tensor, labels: torch.Tensor, loss_weight_or_masked: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum of entropies, number of positions)`` over masked positions predicted correctly."""
    rows, targets = _masked_rows(logits, labels, loss_weight_or_masked)
    with torch.no_grad():
        correct = rows.argmax(dim=-1) == targets
    return _terms(rows, correct, None)


def vocab_parallel_cap_confidence_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_weight_or_masked: torch.Tensor,
    group,
    vocab_start_index: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`cap_confidence_terms` for logits whose last dim is this rank's vocabulary shard.

    The global argmax is the smallest global index among the shards holding the
    global maximum, which is what ``torch.argmax`` returns on the full row.
    """
    rows, correct = _vocab_parallel_correct(logits, labels, loss_weight_or_masked, group, vocab_start_index)
    return _terms(rows, correct, group)


def vocab_parallel_correct_count(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_weight_or_masked: torch.Tensor,
    group,
    vocab_start_index: Optional[int] = None,
) -> torch.Tensor:
    """Number of masked positions whose (global) argmax equals the target: ``L_conf``'s denominator."""
    with torch.no_grad():
        _, correct = _vocab_parallel_correct(logits, labels, loss_weight_or_masked, group, vocab_start_index)
    return correct.sum().to(torch.float32)


def _vocab_parallel_correct(logits, labels, loss_weight_or_masked, group, vocab_start_index):
    """``(masked rows, argmax == target per row)``; the selection is not differentiated."""
    if vocab_start_index is None:
        vocab_start_index = dist.get_rank(group) * logits.shape[-1]
    rows, targets = _masked_rows(logits, labels, loss_weight_or_masked)
    with torch.no_grad():
        if rows.shape[0]:
            local_arg = rows.argmax(dim=-1)  # first maximum within the shard
            local_max = rows.gather(-1, local_arg.unsqueeze(-1)).squeeze(-1).float()
            global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
            no_index = torch.iinfo(torch.long).max
            candidate = torch.where(local_max == global_max, local_arg + vocab_start_index, no_index)
            correct = _all_reduce(candidate, dist.ReduceOp.MIN, group) == targets
        else:
            correct = torch.zeros(0, dtype=torch.bool, device=rows.device)
    return rows, correct


def cap_loss(
    sft_total: torch.Tensor,
    sft_count: torch.Tensor,
    entropy_sum: torch.Tensor,
    correct_count: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """``L_SFT + lambda * L_conf`` from summed terms (report eq. 6); empty selections give 0."""
    return normalised_loss(sft_total, sft_count) + lam * normalised_loss(entropy_sum, correct_count)

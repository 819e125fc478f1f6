"""One forward/backward over a global batch with Megatron's pipeline schedules.

Every rank of a DP replica (its TP/PP/CP ranks) holds the same list of
micro-batches (:class:`~llada_cpt.diffusion.inputs.DiffusionBatch`, built from the
same data and seed).  The loss function returns ``(sum(w * CE), num_eligible)``
per micro-batch; with ``calculate_per_token_loss`` Megatron sums both over
micro-batches, broadcasts the count over PP, all-reduces it over DP x CP and
divides the gradients by it in ``finalize_model_grads``.  Under context
parallelism each CP rank keeps its positions of every micro-batch
(``parallel/cp_batch.py``) and reports its local terms.  Hence loss and
gradients are those of ``sum(w * CE) / eligible`` over the *global* batch,
whatever the DP / PP / TP / grad-accumulation split (``diffusion/loss.py``).

MoE auxiliary losses enter the gradient through Megatron's
``MoEAuxLossAutoScaler`` (scaled by the local token count so that the
per-token normalisation leaves them at ``coeff * aux``); they are reported
separately in :attr:`StepResult.aux_losses`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from ..diffusion.inputs import DiffusionBatch, noised_half
from ..diffusion.loss import normalised_loss, weighted_loss_terms
from ..kernels.linear_cross_entropy import linear_cross_entropy
from ..model.head import head_input, x_t_half
from ..model.wrappers import unwrap
from ..parallel.cp_batch import split_batch
from .distributed import device as current_device

__all__ = ["StepResult", "StepLoss", "ELBO_LOSS", "forward_backward", "batch_to_device"]


@dataclass
class StepResult:
    """Global-batch statistics, identical on every rank."""

    loss: float  # sum(w * CE) / num_eligible over the global batch
    loss_sum: float
    num_eligible: int
    num_masked: int
    num_microbatches: int
    aux_losses: Dict[str, float] = field(default_factory=dict)  # mean per MoE layer and micro-batch
    metrics: Dict[str, float] = field(default_factory=dict)  # the StepLoss's metrics over the global batch
    outputs: List[dict] = field(default_factory=list)  # raw loss reports per micro-batch (last PP stage only)


LossFunc = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, dict]]


@dataclass(frozen=True)
class StepLoss:
    """How a stage turns a micro-batch's model output into Megatron's ``(sum, count, report)``.

    ``make(batch)`` returns the loss function of one micro-batch (``batch`` is
    already on the device and, under CP, this rank's share).  Its ``report`` must
    hold ``"loss_terms"`` = float64 ``[loss sum, count, masked tokens]`` and, when
    ``metric_names`` is not empty, ``"metric_sums"`` = float64 ``[len(metric_names)]``;
    both are summed over micro-batches and DP x CP ranks, and ``finalize`` turns
    the global sums into the logged :attr:`StepResult.metrics` (so ratios of sums
    stay independent of the parallel layout).  Other report entries are handed
    back unreduced in :attr:`StepResult.outputs`.  ``logits=True`` calls the model
    without labels: the loss function then gets the vocab-parallel logits
    ``[b, S, V/tp]`` instead of the per-token cross entropy ``[b, S]``.  For a
    ``[x_t ; x_0]`` batch the head runs on the x_t half only, so ``S`` is that half
    and ``make`` receives :func:`~llada_cpt.diffusion.inputs.noised_half` of the
    batch, whose per-token fields line up with it.
    """

    make: Callable[[DiffusionBatch], LossFunc]
    logits: bool = False
    metric_names: Tuple[str, ...] = ()
    finalize: Optional[Callable[[Dict[str, float]], Dict[str, float]]] = None
    # the loss reads the per-token CE only where loss_weight != 0: the chunked head (model.fused_cross_entropy)
    # then computes just those positions (the masked ones in CPT) and reports 0 elsewhere
    weighted_positions_only: bool = False


def batch_to_device(batch: DiffusionBatch, device: torch.device) -> DiffusionBatch:
    """Move every tensor of ``batch`` (and its layout) to ``device``."""
    if batch.input_ids.device == device:
        return batch
    layout = batch.layout
    layout = dataclasses.replace(
        layout,
        doc_ids=layout.doc_ids.to(device),
        local_positions=None if layout.local_positions is None else layout.local_positions.to(device),
    )
    moved = {
        f.name: getattr(batch, f.name).to(device, non_blocking=True)
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, layout=layout, **moved)


def _loss_func(batch: DiffusionBatch, token_loss: torch.Tensor):
    """Megatron's 3-tuple loss contract: (summed loss, token count, values to report)."""
    total, count = weighted_loss_terms(token_loss, batch.loss_weight, batch.num_eligible)
    count = count.to(torch.int)  # the schedules accumulate counts in an int tensor
    report = torch.stack([total.detach().double(), count.double(), batch.masked.sum().double()])
    return total, count, {"loss_terms": report}


ELBO_LOSS = StepLoss(make=lambda batch: partial(_loss_func, batch), weighted_positions_only=True)
"""The default: ``sum(w * CE) / eligible tokens`` (``diffusion/loss.py``)."""


def head_on_noised_half(model_config) -> bool:
    """Whether the LM head sees only the x_t half of a ``[x_t ; x_0]`` input (:func:`llada_cpt.model.head.x_t_half`).

    Not under sequence parallelism: the head's input is then scattered along the
    sequence over TP ranks and gathered inside the output layer, so no rank can
    cut the halves locally.
    """
    return not getattr(model_config, "sequence_parallel", False)


@contextlib.contextmanager
def _fused_head(model: torch.nn.Module, enabled: bool, rows: Optional[torch.Tensor] = None):
    """For one forward, compute the per-token CE from the head's input without materialised logits.

    Why: ``[S, b, V/tp]`` logits plus their fp32 copy in Megatron's cross entropy are the
    largest activations of the step (152k vocabulary).  The output layer returns its input
    (after any pre-hook, e.g. :func:`~llada_cpt.model.head.head_input`) and keeps the weight it was given
    (the embedding's when tied); the model's ``compute_language_model_loss`` then runs
    :func:`~llada_cpt.kernels.linear_cross_entropy.linear_cross_entropy` (vocab-parallel,
    chunked over tokens).  Same ``[b, S]`` per-token loss, same gradients.  ``rows``: the
    positions (flat ``[S, b]`` order) whose CE the loss reads; the others are not computed
    and report 0.  Only with labels (a :class:`StepLoss` with ``logits=True`` needs the
    logits) and without sequence parallelism (``model.fused_cross_entropy``).
    """
    module = unwrap(model)
    head = getattr(module, "output_layer", None) if getattr(module, "post_process", False) else None
    if not enabled or head is None:
        yield
        return
    tp_group = getattr(getattr(module, "pg_collection", None), "tp", None) \
        or parallel_state.get_tensor_model_parallel_group()
    weights: List[torch.Tensor] = []

    def hidden_as_logits(input_, weight=None, runtime_gather_output=None):
        weights.append(head.weight if weight is None else weight)
        return input_, None

    def loss_from_hidden(labels, hidden):  # labels [b, S], hidden [S, b, h]
        flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.t().reshape(-1)
        if rows is None:
            loss = linear_cross_entropy(flat, weights.pop(), targets, tp_group)
        else:
            picked = linear_cross_entropy(flat.index_select(0, rows), weights.pop(), targets.index_select(0, rows),
                                          tp_group)
            loss = picked.new_zeros(targets.shape).index_copy(0, rows, picked)
        return loss.view(labels.shape[1], labels.shape[0]).t().contiguous()

    shadowed = module.__dict__.get("compute_language_model_loss")  # e.g. a profiler's wrapper
    head.forward = hidden_as_logits
    module.compute_language_model_loss = loss_from_hidden
    try:
        yield
    finally:
        del head.forward, module.compute_language_model_loss
        if shadowed is not None:
            module.compute_language_model_loss = shadowed


def _forward_step(device: torch.device, loss: StepLoss, data_iterator, model):
    # context parallelism: every CP rank holds the full micro-batch and keeps its positions
    batch = split_batch(next(data_iterator), parallel_state.get_context_parallel_world_size(),
                        parallel_state.get_context_parallel_rank())
    half = batch.layout.num_copies == 2 and head_on_noised_half(get_model_config(model))
    fused = not loss.logits and getattr(unwrap(model), "fused_cross_entropy", False)
    rows = None
    if fused and loss.weighted_positions_only:  # from the host copy: no device sync
        weight = (noised_half(batch) if half else batch).loss_weight
        rows = (weight != 0).t().reshape(-1).nonzero().squeeze(1).to(device, non_blocking=True)
    batch = batch_to_device(batch, device)
    view = noised_half(batch) if half else batch  # what the head's output lines up with
    with head_input(model, x_t_half) if half else contextlib.nullcontext(), _fused_head(model, fused, rows):
        output = model(
            batch.input_ids,
            batch.layout.position_ids(local=True),
            attention_mask=batch.layout,
            labels=None if loss.logits else view.labels,
        )
    return output, loss.make(view)


def _global_terms(store: List[dict], num_metrics: int = 0) -> torch.Tensor:
    """Sum the micro-batch terms (and metric sums) on the last stage, reduce over DP x CP, share over PP."""
    terms = torch.zeros(3 + num_metrics, dtype=torch.float64, device=current_device())
    for item in store:
        terms[:3] += item["loss_terms"].to(terms.device)
        if num_metrics:
            terms[3:] += item["metric_sums"].to(terms.device)
    dist.all_reduce(terms, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            terms,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return terms


def _moe_aux_losses(config, num_microbatches: int) -> Dict[str, float]:
    if not getattr(config, "num_moe_experts", None):
        return {}
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    moe_utils.reduce_aux_losses_tracker_across_ranks()
    freq = config.moe_layer_freq
    num_moe_layers = sum(freq) if isinstance(freq, list) else len(range(0, config.num_layers, freq))
    out = {
        name: float(entry["values"].float().sum()) / max(1, num_moe_layers) / num_microbatches
        for name, entry in tracker.items()
    }
    moe_utils.clear_aux_losses_tracker()
    return out


def forward_backward(
    model_chunks: Sequence[torch.nn.Module],
    batches: Sequence[DiffusionBatch],
    forward_only: bool = False,
    loss_fn: Optional[StepLoss] = None,
) -> StepResult:
    """Run all micro-batches of one global batch through Megatron's schedule.

    ``model_chunks``: this rank's model chunks (one per virtual stage), wrapped in
    Megatron DDP for training (``wrap_ddp``); gradients end in ``param.main_grad``,
    already reduced and normalised, ready for ``optimizer.step()``.  DDP grad
    buffers are zeroed first (the optimizer's own ``zero_grad`` is the caller's).
    ``loss_fn`` varies the loss per stage (default :data:`ELBO_LOSS`).
    """
    loss = loss_fn or ELBO_LOSS
    if not batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    shape = tuple(batches[0].input_ids.shape)
    if any(tuple(b.input_ids.shape) != shape for b in batches):
        raise ValueError(
            "all micro-batches of a step must have the same [batch, seq] shape (one block size per step), "
            f"got {sorted({tuple(b.input_ids.shape) for b in batches})}"
        )
    chunks = list(model_chunks)
    config = get_model_config(chunks[0])
    if not forward_only:
        if not all(isinstance(c, DistributedDataParallel) for c in chunks):
            raise TypeError(
                "training needs the model chunks wrapped in Megatron DDP "
                "(llada_cpt.training.distributed.wrap_ddp); it reduces and normalises the gradients"
            )
        if config.finalize_model_grads_func is None:
            config.finalize_model_grads_func = finalize_model_grads
        for chunk in chunks:
            chunk.zero_grad_buffer()
    layout = batches[0].layout
    seq_length = layout.num_copies * layout.seq_length  # global; Megatron divides by CP itself
    device = current_device()
    iterators = [iter(batches) for _ in chunks]
    store = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, device, loss),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=shape[0],
        forward_only=forward_only,
    )
    terms = _global_terms(store, len(loss.metric_names)).tolist()
    total, count, masked = terms[:3]
    metrics = dict(zip(loss.metric_names, terms[3:]))
    if loss.finalize is not None:
        metrics = loss.finalize(metrics)
    return StepResult(
        loss=float(normalised_loss(torch.tensor(total), torch.tensor(count))),
        loss_sum=total,
        num_eligible=int(count),
        num_masked=int(masked),
        num_microbatches=len(batches),
        aux_losses=_moe_aux_losses(config, len(batches)) if not forward_only else {},
        metrics=metrics,
        outputs=list(store),
    )

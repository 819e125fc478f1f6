"""LM head + cross entropy without materialising the logits (chunked over tokens, vocab-parallel).

The plain path builds ``[tokens, V/tp]`` logits in the model dtype, then Megatron's
``vocab_parallel_cross_entropy`` casts them to fp32 and keeps softmax-sized tensors for
backward: for a 152k vocabulary and 4096 x_t tokens that is ~2.5 GB per sequence and
the largest activation of the step.  Here the logits of ``chunk`` tokens at a time are
computed (model dtype GEMM, fp32 softmax statistics), reduced to per-token
``logsumexp`` and target logit, and dropped; backward recomputes each chunk's logits
and turns them into ``grad_hidden`` and an fp32-accumulated ``grad_weight``.  Under
tensor parallelism each rank holds a vocabulary slice: max, sum-exp and target logit
are all-reduced over the TP group exactly as in Megatron's
``vocab_parallel_cross_entropy``, and ``grad_hidden`` is all-reduced like the backward
of ``ColumnParallelLinear``'s input copy.  Plain torch: runs on CPU (tests) and GPU
(no extra wheel).  Cost: one extra head GEMM in backward (the recomputation).
"""
from __future__ import annotations

from typing import Optional, get_args

import torch
import torch.distributed as dist

from llada_cpt.config.schema import CrossEntropyImpl

__all__ = ["linear_cross_entropy", "default_chunk_tokens", "SETTINGS", "use_fused_cross_entropy"]

SETTINGS = get_args(CrossEntropyImpl)  # model.fused_cross_entropy

_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk


def default_chunk_tokens(vocab_local: int) -> int:
    """Tokens per chunk so that a chunk's fp32 logits take about 256 MiB (at least 64 tokens)."""
    return max(64, _CHUNK_BYTES // (4 * max(1, vocab_local)))


def use_fused_cross_entropy(setting: str, sequence_parallel: bool, cuda: bool) -> bool:
    """Resolve ``model.fused_cross_entropy``: ``chunked`` (this module), ``megatron`` (logits + Megatron's
    cross entropy) or ``auto`` = chunked on GPU without sequence parallelism.

    Not under sequence parallelism: the head's input is then split along the sequence and
    gathered inside ``ColumnParallelLinear``, which this path does not reproduce.  On CPU
    ``auto`` keeps Megatron's path (small vocabularies, nothing to save); ``chunked`` forces this one.
    """
    from ..errors import ConfigError

    if setting not in SETTINGS:
        raise ConfigError(f"model.fused_cross_entropy `{setting}` is not one of {', '.join(SETTINGS)}")
    if setting == "chunked" and sequence_parallel:
        raise ConfigError("model.fused_cross_entropy=chunked does not support parallel.sequence_parallel "
                          "(the head's input is split along the sequence); set it to auto or megatron")
    return setting == "chunked" or (setting == "auto" and cuda and not sequence_parallel)


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _target_columns(labels: torch.Tensor, vocab_start: int, vocab_local: int):
    """Local column of each label and whether this rank holds it."""
    local = labels - vocab_start
    held = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1), held


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, vocab_start, chunk):
        n, v_local = hidden.shape[0], weight.shape[0]
        cols, held = _target_columns(labels, vocab_start, v_local)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = (hidden[s:e] @ weight.t()).float()  # the plain path's logits, then .float()
            m = logits.amax(dim=-1)
            _all_reduce(m, group, dist.ReduceOp.MAX)
            tgt = logits.gather(1, cols[s:e, None]).squeeze(1) * held[s:e]
            stats = torch.stack([logits.sub_(m[:, None]).exp_().sum(dim=-1), tgt])  # in place: one fp32 buffer
            _all_reduce(stats, group)
            lse[s:e] = m + torch.log(stats[0])
            target[s:e] = stats[1]
        ctx.save_for_backward(hidden, weight, cols, held, lse)
        ctx.group, ctx.chunk = group, chunk
        return lse - target

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, cols, held, lse = ctx.saved_tensors
        n = hidden.shape[0]
        grad_loss = grad_loss.float()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, n, ctx.chunk):
            e = min(s + ctx.chunk, n)
            grad = (hidden[s:e] @ weight.t()).float().sub_(lse[s:e, None]).exp_()  # softmax, recomputed
            rows = torch.arange(e - s, device=grad.device)
            grad[rows, cols[s:e]] -= held[s:e].to(grad.dtype)
            grad = grad.mul_(grad_loss[s:e, None]).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[s:e] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ hidden[s:e]).float()
        if grad_hidden is not None:
            _all_reduce(grad_hidden, ctx.group)  # the input is replicated over TP ranks
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Per-token ``CE(hidden @ weight.T, labels)`` in fp32, shaped like ``labels``.

    ``hidden``: ``[..., h]`` (model dtype, replicated over the TP group); ``weight``:
    this rank's vocabulary slice ``[V/tp, h]`` (rows ``rank * V/tp ...``); ``labels``:
    global vocabulary ids, shape ``hidden.shape[:-1]``.  Equals Megatron's
    ``vocab_parallel_cross_entropy(hidden @ weight.T, labels)`` up to rounding, with
    the same gradients.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not line up")
    v_local = weight.shape[0]
    rank = dist.get_rank(tp_group) if tp_group is not None and dist.get_world_size(tp_group) > 1 else 0
    chunk = chunk_tokens or default_chunk_tokens(v_local)
    flat = hidden.reshape(-1, hidden.shape[-1])
    with torch.profiler.record_function("llada::cross_entropy"):  # a category of benchmarks/train_step.py --profile
        loss = _LinearCrossEntropy.apply(flat, weight, labels.reshape(-1), tp_group, rank * v_local, chunk)
    return loss.view(labels.shape)

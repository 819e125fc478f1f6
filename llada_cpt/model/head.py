"""What the LM head (the output layer) computes logits for.

The ``[S, b, V]`` logits are the largest activation of a forward (8192 positions
x 152k vocabulary = 2.5 GB in bf16), yet most callers read only some positions:
training's loss reads the x_t half of ``[x_t ; x_0]``, the sampler the last few
positions, likelihood scoring the continuation tokens.  :func:`head_input` feeds
the output layer only those hidden states (a forward pre-hook), so the other
logits are never computed; every layer before the head still runs on the whole
sequence.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .wrappers import unwrap

__all__ = ["head_input", "x_t_half"]


@contextlib.contextmanager
def head_input(model: torch.nn.Module, select: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """For the duration, the output layer of ``model`` (bare or wrapped) gets ``select(hidden)``.

    ``hidden`` is ``[S local, b, h]`` (sequence first, as Megatron's GPTModel feeds its head); ``select``
    returns ``[S', b', h]``, and the model then returns ``[b', S', V]`` logits.  Hooks run in the order they
    were entered, so nested selections compose (outer first).  A pipeline stage without the head: no-op.
    """
    module = unwrap(model)
    head = getattr(module, "output_layer", None) if getattr(module, "post_process", False) else None
    if head is None:
        yield
        return

    def hook(_module, args, kwargs):
        if args:
            return (select(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "input_": select(kwargs["input_"])}

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def x_t_half(hidden: torch.Tensor) -> torch.Tensor:
    """The first (x_t) half of the hidden states of a ``[x_t ; x_0]`` input.

    Why: the x_0 half carries no loss (weight 0), yet its logits would cost half of the
    head's FLOPs and of the logits memory.  The clean half still runs through every layer
    (x_t queries attend to its keys); only the head skips it.  Hidden states are
    ``[x_t local ; x_0 local]`` also under context parallelism, so the first half is the
    x_t half on every rank.
    """
    return hidden[: hidden.shape[0] // 2]

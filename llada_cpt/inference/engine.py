"""Loading a checkpoint for generation, and running the Megatron model as the sampler's denoiser.

:func:`inspect_checkpoint` reads what a checkpoint directory says about itself
(``config.yaml``, ``metrics.json``, the tokenizer, the trained block size) without
building a model, so bad inputs fail in a second.  :func:`load_model_for_inference`
then builds the ``GPTModel`` for the requested TP size (PP = CP = EP = 1, no DDP,
whole model on each rank), loads the weights with ``dist_checkpointing`` (which
reshards from whatever layout the checkpoint was saved in) and returns an
:class:`InferenceModel`.

:class:`ModelRunner` adapts a training or inference model to the sampler:
unwraps DDP, switches to eval/no_grad for the duration of a session (restoring
the previous mode), passes the :class:`~.kv_cache.KVCache` in ``attention_mask``,
computes logits only for the positions the sampler reads (a pre-hook on the
output layer slices the hidden states: a prefill of thousands of tokens must not
materialise ``[tokens, vocab]`` logits) and gathers them over TP.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..checkpoint.info import CheckpointInfo
from ..checkpoint.paths import CheckpointError
from ..config.schema import Config
from ..errors import ConfigError
from ..model.head import head_input
from .kv_cache import KVCache
from .sampler import SamplerConfig

__all__ = [
    "CheckpointError",
    "InferenceInfo",
    "InferenceModel",
    "ModelRunner",
    "inspect_checkpoint",
    "load_model_for_inference",
    "block_size_warning",
]


@dataclass(frozen=True)
class InferenceInfo(CheckpointInfo):
    """A checkpoint (no model built) and the tokenizer its prompts are encoded with."""

    @cached_property
    def tokenizer(self):  # llada_cpt.data.tokenizer.Tokenizer
        from ..data.tokenizer import resolve_tokenizer

        return resolve_tokenizer(self.config.data, missing="the checkpoint's config.yaml names no tokenizer "
                                 "(data.tokenizer) and is not a demo run; the run's tokenizer is needed to encode "
                                 "prompts")

    @property
    def mask_id(self) -> int:
        mask_id = self.config.diffusion.mask_id
        return int(self.tokenizer.mask_id if mask_id is None else mask_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eod_id)


@dataclass
class InferenceModel:
    """A loaded model plus everything the sampler needs from its checkpoint."""

    model: torch.nn.Module  # GPTModel (pre and post process)
    info: InferenceInfo
    tensor_parallel_size: int
    dtype: torch.dtype

    @property
    def tokenizer(self):
        return self.info.tokenizer

    @property
    def config(self) -> Config:
        return self.info.config

    def fill_defaults(self, cfg: SamplerConfig) -> SamplerConfig:
        """``cfg`` with the unset ids / sizes taken from the checkpoint."""
        return replace(
            cfg,
            mask_id=self.info.mask_id if cfg.mask_id is None else cfg.mask_id,
            eos_id=self.info.eos_id if cfg.eos_id is None else cfg.eos_id,
            vocab_size=self.tokenizer.vocab_size if cfg.vocab_size is None else cfg.vocab_size,
            context_length=self.info.context_length if cfg.context_length is None else cfg.context_length,
        )


# ------------------------------------------------------------------------------ checkpoint


def block_size_warning(info: InferenceInfo, block_size: int) -> Optional[str]:
    """A warning line when ``block_size`` is not the block size the checkpoint was last trained with."""
    if block_size == info.trained_block_size:
        return None
    return (f"WARNING: block size {block_size} differs from the checkpoint's trained block size "
            f"{info.trained_block_size} (the WSD schedule in its config.yaml); quality may drop - "
            f"pass --block-size {info.trained_block_size} to match")


def inspect_checkpoint(path: str | os.PathLike) -> InferenceInfo:
    """Resolve ``path`` (run directory with ``latest``, or an ``iter_*`` directory) and read its metadata."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint `{p}` does not exist; pass a run directory (with a `latest` file) or an "
                              "iter_* checkpoint directory")
    info = InferenceInfo.read(p)
    info.tokenizer  # read now: a missing config.yaml or tokenizer is one line before any model is built
    return info


def load_model_for_inference(ckpt: str | os.PathLike | InferenceInfo, tp: int = 1, precision: str = "auto",
                             seed: int = 0) -> InferenceModel:
    """Build the checkpoint's model for ``tp`` tensor-parallel ranks and load its weights (no optimizer).

    Initialises ``torch.distributed`` / Megatron's parallel state (a world of one
    without a launcher; under ``--nproc`` / torchrun the world is ``tp x dp``).
    ``precision``: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
    """
    from ..checkpoint.megatron import load_checkpoint
    from ..config.schema import ParallelConfig
    from ..model.provider import build_model, resolve_dtype
    from ..training.distributed import initialize

    info = ckpt if isinstance(ckpt, InferenceInfo) else inspect_checkpoint(ckpt)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, use_distributed_optimizer=False)
    initialize(parallel, seed=seed)
    stored = info.stored_embedding  # build exactly the stored rows, whatever TP size saved them
    rows = stored.shape[0] if stored is not None else None
    model_cfg = info.config.model
    vocab = info.tokenizer.vocab_size
    if rows is not None:
        if rows % tp:
            raise ConfigError(f"the checkpoint's vocabulary ({rows} rows) cannot be split over tp={tp} ranks; "
                              "use a tensor-parallel size that divides it")
        # build exactly the stored (already padded) size, whatever TP size the checkpoint was saved with
        model_cfg = replace(model_cfg, make_vocab_size_divisible_by=1)
        vocab = rows
    (model,) = build_model(model_cfg, parallel, precision, vocab, pre_process=True, post_process=True)
    with warnings.catch_warnings():  # torch's deprecation notices about the DCP calls Megatron makes
        warnings.simplefilter("ignore", FutureWarning)
        load_checkpoint(info.path, [model], optimizer=None, scheduler=None, restore_rng=False)
    model.eval()
    return InferenceModel(model=model, info=info, tensor_parallel_size=tp, dtype=resolve_dtype(precision))


# ------------------------------------------------------------------------------ denoiser


class ModelRunner:
    """The sampler's :class:`~.sampler.Denoiser` over a Megatron ``GPTModel`` (bare or DDP-wrapped)."""

    def __init__(self, model):
        from ..model.wrappers import unwrap

        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        if len(chunks) != 1:
            raise ConfigError(f"generation needs the whole model in one chunk, got {len(chunks)} (virtual pipeline "
                              "stages); generate with pipeline_model_parallel_size=1")
        self.wrapped = chunks[0]
        self.module = unwrap(chunks[0])
        if not (getattr(self.module, "pre_process", True) and getattr(self.module, "post_process", True)):
            raise ConfigError("generation needs every layer on each rank (pipeline_model_parallel_size=1); "
                              "load the checkpoint with load_model_for_inference, which reshards it")
        if getattr(getattr(self.module, "config", None), "sequence_parallel", False):
            raise ConfigError("generation does not support sequence parallelism; build the model with "
                              "parallel.sequence_parallel=false (load_model_for_inference does)")
        self._keep = 0

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @contextlib.contextmanager
    def session(self) -> Iterator["ModelRunner"]:
        """Eval mode, no autograd and the logits slice for the duration; the previous mode is restored."""
        was_training = self.wrapped.training
        self.wrapped.eval()
        try:
            with torch.no_grad(), head_input(self.module, self._last_positions):
                yield self
        finally:
            self.wrapped.train(was_training)

    def _last_positions(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[hidden.shape[0] - self._keep:]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, num_logits: int) -> torch.Tensor:
        self._keep = int(num_logits)
        # GPTModel has no position embedding (RoPE is applied in attention from the cache's plan)
        return self.module(tokens, positions, attention_mask=cache, runtime_gather_output=True)

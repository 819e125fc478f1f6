"""``generate()``: the block sampler run on a Megatron model (the glue between :mod:`.engine` and :mod:`.sampler`).

The sampler itself knows only the denoiser interface and the KV cache; this
module wraps a Megatron model in :class:`~.engine.ModelRunner` and fills the
settings a loaded checkpoint knows (mask/EOS ids, vocabulary, context), so that
neither of the two modules has to import the other.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence

from ..errors import ConfigError
from .engine import InferenceModel, ModelRunner
from .sampler import GenerationBatch, SamplerConfig, sample

__all__ = ["generate"]


def generate(model, prompts_ids: Sequence[Sequence[int]], cfg: Optional[SamplerConfig] = None, *,
             tokenizer=None, samples_per_prompt: int = 1,
             progress: Optional[Callable[[int], None]] = None) -> GenerationBatch:
    """Block-diffusion generation from a Megatron model; ``list[GenerationResult]`` with ``.stats``.

    ``model``: an :class:`~llada_cpt.inference.engine.InferenceModel`, a ``GPTModel``,
    or training chunks (a DDP-wrapped chunk or a list of one); it is put in eval
    mode under ``no_grad`` for the call and its train/eval mode restored.  Every TP
    rank must call this with the same prompts and config.  ``samples_per_prompt``
    repeats each prompt (rollout groups: results are prompt-major), drawing
    different samples when ``temperature > 0``.  Settings left at None in ``cfg``
    come from an ``InferenceModel`` (mask/EOS ids, vocabulary, context).
    """
    cfg = replace(cfg) if cfg is not None else SamplerConfig()
    if isinstance(model, InferenceModel):
        cfg = model.fill_defaults(cfg)
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model = model.model
    if samples_per_prompt < 1:
        raise ConfigError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    prompts = [p for p in prompts_ids for _ in range(samples_per_prompt)]
    runner = ModelRunner(model)
    with runner.session():
        return sample(runner, prompts, cfg, progress=progress, tokenizer=tokenizer)

"""Block-diffusion generation: sampler with KV cache and step map, checkpoint loading, CLIs.

``generate(model, prompts_ids, SamplerConfig(...))`` -> ``list[GenerationResult]``
(``.stats`` on the list) works on a model from :func:`load_model_for_inference` or
on the (DDP-wrapped) chunks of a training process.  ``generate`` and the engine
(Megatron) part are imported lazily so that the sampler's pure parts stay light.
"""
from .kv_cache import KVCache
from .sampler import (
    GenerationBatch,
    GenerationResult,
    GenerationStats,
    PromptTooLongError,
    SamplerConfig,
    sample,
)

__all__ = [
    "KVCache",
    "SamplerConfig",
    "GenerationResult",
    "GenerationStats",
    "GenerationBatch",
    "PromptTooLongError",
    "generate",
    "sample",
    "load_model_for_inference",
    "inspect_checkpoint",
    "InferenceModel",
]


def __getattr__(name):
    if name == "generate":
        from .generation import generate

        return generate
    if name in ("load_model_for_inference", "inspect_checkpoint", "InferenceModel"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)

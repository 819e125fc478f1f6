"""Layer specs: Megatron's GPT decoder specs with our block-diffusion core attention.

We start from ``get_gpt_decoder_block_spec`` (dense and MoE layers, the
``moe_layer_freq`` pattern, pipeline slicing) and replace only ``core_attention``.
The Transformer Engine flavour is used when TE is importable *and* CUDA is
available (fused norm+linear, grouped GEMM); otherwise the pure Megatron-Core
"local" modules, which need neither TE nor apex and run on CPU.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from ..attention.core import block_diffusion_attention_class

__all__ = ["use_transformer_engine", "decoder_block_spec"]


def use_transformer_engine() -> bool:
    """TE layer specs only where TE can run (it is absent from CPU installs)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def decoder_block_spec(
    config: TransformerConfig,
    attention_backend: str = "reference",
    rotary_base: float = 10000.0,
    vp_stage: Optional[int] = None,
    rotary_scaling=None,
) -> TransformerBlockSubmodules:
    """Specs of the layers built on this pipeline stage, each with our core attention."""
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_transformer_engine(), normalization=config.normalization, vp_stage=vp_stage
    )
    attention = block_diffusion_attention_class(attention_backend, rotary_base, rotary_scaling)
    layers = []
    for spec in block.layer_specs:
        spec = copy.deepcopy(spec)  # dense/MoE specs are shared objects across layers
        spec.submodules.self_attention.submodules.core_attention = attention
        layers.append(spec)
    block.layer_specs = layers
    return block

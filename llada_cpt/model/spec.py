"""Layer specs: Megatron's GPT decoder specs with our block-diffusion core attention.

We start from ``get_gpt_decoder_block_spec`` (dense and MoE layers, the
``moe_layer_freq`` pattern, pipeline slicing) and replace only ``core_attention``.
``model.transformer_impl`` picks the layer modules: ``transformer_engine`` (fused
norm+linear, grouped GEMM; TE ships in the NGC image only), ``local`` (Megatron-Core's
torch modules: need neither TE nor apex, run on CPU) or ``auto`` (TE when importable
*and* CUDA is available, else local).
"""
from __future__ import annotations

import copy
from typing import Optional, get_args

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from ..attention.core import block_diffusion_attention_class
from ..config.schema import TransformerImpl
from ..errors import ConfigError
from ..kernels.te import import_error as te_import_error

__all__ = ["use_transformer_engine", "decoder_block_spec"]


def use_transformer_engine(setting: str = "auto") -> bool:
    """Whether the layers use TE modules for ``model.transformer_impl=setting``.

    ``auto``: only where TE can run (importable and CUDA present; absent from CPU installs).
    ``transformer_engine`` without an importable TE or without CUDA is a :class:`ConfigError`.
    """
    if setting == "local":
        return False
    if setting == "auto":
        return torch.cuda.is_available() and te_import_error() is None
    if setting != "transformer_engine":
        raise ConfigError(f"model.transformer_impl `{setting}` is not one of {', '.join(get_args(TransformerImpl))}")
    reason = te_import_error()
    if reason is not None:
        raise ConfigError(
            f"model.transformer_impl=transformer_engine but Transformer Engine is not importable ({reason}); "
            "run in the NGC PyTorch image (Dockerfile) or set model.transformer_impl=local (or auto)")
    if not torch.cuda.is_available():
        raise ConfigError("model.transformer_impl=transformer_engine needs a CUDA device; "
                          "set model.transformer_impl=local (or auto) on CPU")
    return True


def decoder_block_spec(
    config: TransformerConfig,
    attention_backend: str = "reference",
    rotary_base: float = 10000.0,
    vp_stage: Optional[int] = None,
    rotary_scaling=None,
    transformer_impl: str = "auto",
) -> TransformerBlockSubmodules:
    """Specs of the layers built on this pipeline stage, each with our core attention."""
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_transformer_engine(transformer_impl), normalization=config.normalization,
        vp_stage=vp_stage,
    )
    attention = block_diffusion_attention_class(attention_backend, rotary_base, rotary_scaling)
    layers = []
    for spec in block.layer_specs:
        spec = copy.deepcopy(spec)  # dense/MoE specs are shared objects across layers
        spec.submodules.self_attention.submodules.core_attention = attention
        layers.append(spec)
    block.layer_specs = layers
    return block

"""Model providers: our :class:`ModelConfig` -> Megatron-Core ``GPTModel`` chunks.

The model is a stock ``GPTModel`` whose layers use :mod:`llada_cpt.model.spec`
(block-diffusion core attention) and ``position_embedding_type="none"``: RoPE is
applied inside attention with document-restarting positions, identical in the
x_t and x_0 halves.  ``calculate_per_token_loss=True`` makes Megatron's schedules
normalise by the global number of loss-eligible tokens (see ``diffusion/loss.py``).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from ..attention.rope import Llama3RopeScaling
from ..config.choices import choice_problem
from ..config.schema import ModelConfig, ParallelConfig
from ..errors import ConfigError
from ..kernels.linear_cross_entropy import use_fused_cross_entropy
from .spec import decoder_block_spec, use_transformer_engine

__all__ = ["resolve_dtype", "padded_vocab_size", "transformer_config", "build_model", "moe_layer_pattern"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_dtype(precision: str = "auto") -> torch.dtype:
    """``auto``: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if precision not in _DTYPES:
        raise ConfigError(f"train.precision `{precision}` is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[precision]


def padded_vocab_size(vocab_size: int, model_cfg: ModelConfig, tensor_parallel_size: int) -> int:
    """Round the vocabulary up to ``make_vocab_size_divisible_by * tp`` (Megatron's rule)."""
    multiple = model_cfg.make_vocab_size_divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def moe_layer_pattern(model_cfg: ModelConfig) -> List[int]:
    """``moe_layer_freq`` list: 0 (dense) for the first ``moe_first_dense_layers`` layers, then 1."""
    k = model_cfg.moe_first_dense_layers
    if not 0 <= k < model_cfg.num_layers:
        raise ConfigError(
            f"model.moe_first_dense_layers={k} must be in [0, num_layers={model_cfg.num_layers})"
        )
    return [0] * k + [1] * (model_cfg.num_layers - k)


def _check(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> None:
    m, p = model_cfg, parallel_cfg
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not a multiple of num_query_groups={groups}"
        )
    if m.num_attention_heads % p.tensor_model_parallel_size:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}"
        )
    if m.num_layers % p.pipeline_model_parallel_size:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by "
            f"parallel.pipeline_model_parallel_size={p.pipeline_model_parallel_size}"
        )
    for name in ("activation", "recompute_granularity", "normalization"):  # a ModelConfig made in code
        problem = choice_problem(f"model.{name}", getattr(m, name), typing.get_type_hints(ModelConfig)[name])
        if problem:
            raise ConfigError(problem)
    if p.sequence_parallel and not use_transformer_engine(m.transformer_impl):
        raise ConfigError(
            "parallel.sequence_parallel needs Transformer Engine on GPU (the torch norms of the "
            "local layer spec do not support it); set parallel.sequence_parallel=false"
        )
    if m.num_experts:
        if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
            raise ConfigError(
                "model.moe_router_enable_expert_bias (aux-loss-free balancing) needs "
                "model.moe_router_score_function=sigmoid"
            )
        if m.num_experts % p.expert_model_parallel_size:
            raise ConfigError(
                f"model.num_experts={m.num_experts} is not divisible by "
                f"parallel.expert_model_parallel_size={p.expert_model_parallel_size}"
            )
        moe_layer_pattern(m)


# settings that only some supported Megatron versions have (transformer_impl: 0.17+)
_VERSION_DEPENDENT = ("transformer_impl",)


def _known_fields(**kwargs) -> dict:
    """Drop the version-dependent settings this Megatron does not know; any other unknown one fails."""
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    return {k: v for k, v in kwargs.items() if k in names or k not in _VERSION_DEPENDENT}


def transformer_config(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig, precision: str = "auto"
) -> TransformerConfig:
    """The Megatron ``TransformerConfig`` of a model; dropout off, per-token loss on."""
    _check(model_cfg, parallel_cfg)
    m, p = model_cfg, parallel_cfg
    dtype = resolve_dtype(precision)
    swiglu = m.activation == "swiglu"
    te = use_transformer_engine(m.transformer_impl)
    on_gpu = torch.cuda.is_available()
    moe = {}
    if m.num_experts:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            # grouped GEMM is a kernel choice (TE on GPU); numerically SequentialMLP is the same
            moe_grouped_gemm=m.moe_grouped_gemm and te,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff if m.moe_router_load_balancing_type != "none" else 0.0,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
            moe_router_dtype="fp32",
            moe_layer_freq=moe_layer_pattern(m),
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        )
    cfg = TransformerConfig(
        **_known_fields(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=m.num_query_groups or m.num_attention_heads,
            kv_channels=m.kv_channels or m.hidden_size // m.num_attention_heads,
            normalization=m.normalization,
            layernorm_epsilon=m.norm_epsilon,
            gated_linear_unit=swiglu,
            activation_func=F.silu if swiglu else F.gelu,
            add_bias_linear=False,
            add_qkv_bias=m.add_qkv_bias,
            qk_layernorm=m.qk_layernorm,
            init_method_std=m.init_method_std,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=getattr(p, "virtual_pipeline_model_parallel_size", None),
            context_parallel_size=p.context_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            sequence_parallel=p.sequence_parallel,
            calculate_per_token_loss=True,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            # fused element-wise kernels only pay off (and compile) on GPU
            bias_activation_fusion=on_gpu and swiglu,
            bias_dropout_fusion=on_gpu,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            # full: recompute every layer in backward; selective: only the core attention
            recompute_granularity=m.recompute_granularity,
            recompute_method="uniform" if m.recompute_granularity == "full" else None,
            recompute_num_layers=1 if m.recompute_granularity == "full" else None,
            transformer_impl="transformer_engine" if te else "local",
            **moe,
        )
    )
    return cfg


def rope_scaling(model_cfg: ModelConfig) -> Optional[Llama3RopeScaling]:
    """The RoPE scaling ``model.rope_scaling`` asks for (``llama3``) or None."""
    if not model_cfg.rope_scaling:
        return None
    return Llama3RopeScaling(model_cfg.rope_scaling_factor, model_cfg.rope_low_freq_factor,
                             model_cfg.rope_high_freq_factor, model_cfg.rope_original_max_position_embeddings)


def build_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    precision: str,
    vocab_size: int,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> List[GPTModel]:
    """One ``GPTModel`` per virtual pipeline stage held by this rank (one without VPP).

    Needs :func:`llada_cpt.training.distributed.initialize` first.  ``vocab_size`` is
    the tokenizer's; it is padded to ``make_vocab_size_divisible_by * tp``.
    ``pre_process``/``post_process`` default to Megatron's first/last-stage rule.
    """
    config = transformer_config(model_cfg, parallel_cfg, precision)
    padded = padded_vocab_size(vocab_size, model_cfg, parallel_cfg.tensor_model_parallel_size)
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks: List[GPTModel] = []
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(
                config, model_cfg.attention_backend, model_cfg.rotary_base, vp_stage=vp_stage,
                rotary_scaling=rope_scaling(model_cfg), transformer_impl=model_cfg.transformer_impl,
            ),
            vocab_size=padded,
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=first if pre_process is None else pre_process,
            post_process=last if post_process is None else post_process,
            share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
            position_embedding_type="none",
            vp_stage=vp_stage,
        )
        _place_like_megatron(model, config.params_dtype)
        # read by training/step.py: LM head + CE without materialised logits (kernels/linear_cross_entropy.py)
        model.fused_cross_entropy = use_fused_cross_entropy(
            model_cfg.fused_cross_entropy, parallel_cfg.sequence_parallel, torch.cuda.is_available())
        chunks.append(model)
    return chunks


def _place_like_megatron(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every parameter on this rank's GPU and in the model's dtype, as Megatron-LM's ``get_model`` does.

    Why: without Transformer Engine the norms are ``torch.nn.RMSNorm``/``LayerNorm``, created on the
    CPU in fp32 whatever ``params_dtype``/``use_cpu_initialization`` say.  Training hid it (DDP moves
    parameters into its GPU buffers), generation and evaluation crashed on a CPU weight, and bf16
    activations missed torch's fused norm kernel.  Megatron-LM calls ``.cuda()`` and wraps the model
    in ``Float16Module``; casting in place instead keeps the module paths (checkpoint keys).
    """
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if dtype == torch.float32:
        return
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)

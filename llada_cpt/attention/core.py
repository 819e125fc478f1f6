"""Block-diffusion core attention: a drop-in for Megatron's ``DotProductAttention``.

Megatron's ``SelfAttention`` projects q/k/v, applies QK-norm and then calls its
``core_attention`` submodule with ``attention_mask``.  We swap that submodule for
:class:`BlockDiffusionAttention`, which receives an
:class:`~llada_cpt.diffusion.layout.AttentionLayout` (the mask *description*) in
``attention_mask``, applies RoPE with the layout's document-restarting positions
(the model is built with ``position_embedding_type="none"``) and hands
``[b, heads, s, d]`` tensors to a backend chosen by name.

Backends are plain callables ``fn(q, k, v, layout, softmax_scale) -> out`` with
``q`` ``[b, hq, Sq, d]`` and ``k``/``v`` ``[b, hkv, Sk, d]`` (GQA is the backend's
business) returning ``[b, hq, Sq, d]``; they live in :data:`ATTENTION_BACKENDS`.
``reference`` (``llada_cpt.kernels.reference``) is always registered; the fused ones
(flex, cudnn, te) and ``auto`` are resolved by ``llada_cpt.kernels.registry``, which
checks that they can train here.  ``kernels`` never imports ``attention``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from ..diffusion.layout import AttentionLayout
from ..errors import ConfigError
from ..kernels import registry
from ..kernels.reference import reference_attention
from ..parallel.cp_attention import gather_context_kv
from .rope import Llama3RopeScaling, rotary_tables, rotate_qk

__all__ = [
    "AttentionBackend",
    "ATTENTION_BACKENDS",
    "register_backend",
    "resolve_backend",
    "BlockDiffusionAttention",
    "block_diffusion_attention_class",
]

AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionLayout, float], torch.Tensor]

ATTENTION_BACKENDS: Dict[str, AttentionBackend] = {"reference": reference_attention}


def register_backend(name: str, fn: AttentionBackend) -> None:
    """Make ``fn`` available as ``model.attention_backend=name``."""
    ATTENTION_BACKENDS[name] = fn


def resolve_backend(name: str) -> AttentionBackend:
    """The backend called ``name``; fused ones and ``auto`` are resolved by ``llada_cpt.kernels.registry``.

    That registry checks that the kernel can train on this device (ConfigError
    with the fix otherwise) and picks the fastest available one for ``auto``
    (``reference`` on CPU).
    """
    if name in ATTENTION_BACKENDS:
        return ATTENTION_BACKENDS[name]
    return registry.resolve(name, ATTENTION_BACKENDS)


class BlockDiffusionAttention(MegatronModule):
    """Core attention over an :class:`AttentionLayout` (same signature as ``DotProductAttention``).

    Inputs ``query`` ``[Sq, b, heads/tp, d]``, ``key``/``value`` ``[Sk, b, groups/tp, d]``
    (after QK-norm, before RoPE); output ``[Sq, b, heads/tp * d]``.  Queries are the
    local tokens of the layout (all of them without context parallelism) and keys
    must cover the whole sequence.  Subclasses made by
    :func:`block_diffusion_attention_class` fix the backend and the RoPE base.
    """

    backend_name: str = "reference"
    rotary_base: float = 10000.0
    rotary_scaling: Optional[Llama3RopeScaling] = None

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        # Unlike DotProductAttention there is no `context_parallel_size == 1` assert:
        # context parallelism of the block-diffusion mask is ours (llada_cpt.parallel).
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ConfigError(f"attention dropout {dropout} is not supported by block-diffusion attention; set 0")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        self.cp_group = getattr(pg_collection, "cp", None)  # K/V all-gather under context parallelism
        self.layer_number = max(1, layer_number)
        self.head_dim = config.kv_channels
        self.num_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_groups_per_partition = divide(config.num_query_groups, tp)
        self.hidden_size_per_partition = self.num_heads_per_partition * self.head_dim
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.backend = resolve_backend(self.backend_name)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: AttentionLayout,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        # generation: a llada_cpt.inference.kv_cache.KVCache rides in `attention_mask` and does
        # RoPE, the cached keys/values of committed blocks and the attention itself
        cached_attention = getattr(attention_mask, "cached_attention", None)
        if cached_attention is not None:
            return cached_attention(self, query, key, value)
        if not isinstance(attention_mask, AttentionLayout):
            raise TypeError(
                "BlockDiffusionAttention needs an AttentionLayout in `attention_mask` "
                f"(got {type(attention_mask).__name__}); build batches with "
                "llada_cpt.diffusion.build_diffusion_batch and pass batch.layout"
            )
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("attention_bias / packed_seq_params are not used with an AttentionLayout")
        layout = attention_mask
        local_tokens = layout.global_index(True).numel()
        if query.shape[0] != local_tokens or layout.doc_ids.shape[0] != query.shape[1]:
            raise ValueError(
                f"attention layout has {local_tokens} local tokens per sequence (batch "
                f"{layout.doc_ids.shape[0]}) but the query has {query.shape[0]} (batch {query.shape[1]})"
            )
        # cos/sin once per layout (all layers share it); keys are local too unless the caller gathered them
        rope = (self.head_dim, self.rotary_base, self.rotary_scaling, query.device, query.dtype)
        q_tables = rotary_tables(layout, True, *rope)
        k_tables = q_tables if key.shape[0] == query.shape[0] else rotary_tables(layout, False, *rope)
        query, key = rotate_qk(query, key, q_tables, k_tables)
        # context parallelism: this rank's queries need the (RoPE'd) keys/values of all tokens
        key, value = gather_context_kv(key, value, layout, self.cp_group)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self.backend(q, k, v, layout, self.softmax_scale)
        # [b, h, s, d] -> [s, b, h * d]: a view, no copy, when the backend keeps the query's [s, b, h, d]
        # memory order (flex does, and the reference; tested), a copy otherwise
        return out.permute(2, 0, 1, 3).flatten(2)


@functools.lru_cache(maxsize=None)
def block_diffusion_attention_class(backend: str = "reference", rotary_base: float = 10000.0,
                                    rotary_scaling: Optional[Llama3RopeScaling] = None) -> type:
    """A :class:`BlockDiffusionAttention` subclass with ``backend`` and the RoPE settings fixed.

    Megatron instantiates ``core_attention`` itself (a class, not a ``ModuleSpec``
    with params), so the per-model settings travel as class attributes.
    """
    resolve_backend(backend)  # fail at spec time with a clear message
    return type(
        f"BlockDiffusionAttention_{backend}",
        (BlockDiffusionAttention,),
        {"backend_name": backend, "rotary_base": float(rotary_base), "rotary_scaling": rotary_scaling,
         "__module__": __name__},
    )

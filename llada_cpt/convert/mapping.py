"""Hugging Face <-> Megatron-Core: architectures, config mapping and tensor layouts (no Megatron import).

Supported HF architectures (``model_type``): ``llama``, ``qwen2`` (QKV bias),
``qwen3`` (per-head QK RMSNorm) and ``qwen3_moe`` (experts + softmax top-k
router).  Anything a Megatron ``GPTModel`` built by :mod:`llada_cpt.model.provider`
cannot represent exactly (RoPE scaling, sliding windows, output-projection or
MLP biases, MoE without renormalised top-k, ...) is refused with one message
rather than converted approximately.

Tensor layouts (megatron-core 0.16-0.19):

* ``linear_qkv`` is ``[groups * (q_per_group + 2) * head_dim, hidden]``: for each
  query group its q heads, then its k head, then its v head (see
  ``SelfAttention.get_query_key_value_tensors``); the QKV bias likewise.  HF's
  GQA maps query head ``h`` to kv head ``h // q_per_group``, i.e. the same groups.
  TP splits this tensor contiguously along dim 0 (whole groups per rank).
* ``linear_fc1`` of a SwiGLU MLP (dense or expert) is ``cat(gate, up)``; a TP
  rank holds ``cat(gate_r, up_r)`` (its slice of each half), which is also how
  ``dist_checkpointing`` stores it globally.
* Norms: the local spec has ``input_layernorm.weight``/``pre_mlp_layernorm.weight``;
  the TE spec fuses them as ``linear_qkv.layer_norm_weight``/``linear_fc1.layer_norm_weight``
  (dense layers; MoE layers keep ``pre_mlp_layernorm``).  Experts are
  ``experts.local_experts.{i}.linear_fc{1,2}.weight`` (SequentialMLP) or
  ``experts.linear_fc{1,2}.weight{i}`` (TE GroupedMLP).  :func:`canonical_name`
  maps all of these, with pipeline/expert offsets, to one global name.
* Embedding and output layer are padded to ``make_vocab_size_divisible_by * tp``
  rows: zero rows on import, stripped on export.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..checkpoint.paths import EMBEDDING_KEY
from ..config.schema import ModelConfig
from .errors import ConvertError

__all__ = [
    "Architecture",
    "ARCHITECTURES",
    "Slot",
    "detect_architecture",
    "model_config_from_hf",
    "hf_config_from_model",
    "architecture_of_model",
    "model_slots",
    "hf_tensor_names",
    "fuse_qkv",
    "split_qkv",
    "to_megatron",
    "to_hf",
    "tp_shard",
    "canonical_name",
    "is_expert_param",
]


@dataclass(frozen=True)
class Architecture:
    """What distinguishes one supported HF decoder family from another."""

    model_type: str
    hf_class: str
    qkv_bias: bool
    qk_norm: bool
    moe: bool


ARCHITECTURES: Dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False, moe=False),
        Architecture("qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False, moe=False),
        Architecture("qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True, moe=False),
        Architecture("qwen3_moe", "Qwen3MoeForCausalLM", qkv_bias=False, qk_norm=True, moe=True),
    )
}
_BY_CLASS = {a.hf_class: a for a in ARCHITECTURES.values()}
_SUPPORTED = ", ".join(ARCHITECTURES)


def detect_architecture(hf: dict) -> Architecture:
    """The architecture named by ``model_type`` (or ``architectures[0]``) of a ``config.json``."""
    model_type = hf.get("model_type")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    classes = hf.get("architectures") or []
    if not model_type and classes and classes[0] in _BY_CLASS:
        return _BY_CLASS[classes[0]]
    name = model_type or (classes[0] if classes else "<none>")
    raise ConvertError(f"architecture `{name}` is not supported; supported model_type values: {_SUPPORTED}")


# ----------------------------------------------------------------------------- config mapping


LLAMA3_SCALING_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                       "high_freq_factor": "rope_high_freq_factor",
                       "original_max_position_embeddings": "rope_original_max_position_embeddings"}


def _rope_fields(hf: dict, problems: List[str]) -> dict:
    """``rotary_base`` and, for Llama 3.1+ (``rope_type: llama3``), the ``rope_scaling*`` fields.

    transformers 4.x writes ``rope_theta`` + ``rope_scaling``, 5.x ``rope_parameters``.
    """
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    fields = {"rotary_base": float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)}
    for scaling in (hf.get("rope_scaling"), params):
        if not isinstance(scaling, dict):
            continue
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            missing = [k for k in LLAMA3_SCALING_KEYS if k not in scaling]
            if missing:
                problems.append(f"RoPE scaling `llama3` without {missing}")
                continue
            fields["rope_scaling"] = "llama3"
            for key, ours in LLAMA3_SCALING_KEYS.items():  # cast like our defaults (int or float)
                fields[ours] = type(getattr(ModelConfig, ours))(scaling[key])
        elif kind not in (None, "default"):
            problems.append(f"RoPE scaling `{kind}` (supported: none, llama3)")
    return fields


def _check_full_attention(hf: dict, problems: List[str]) -> None:
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        problems.append("sliding-window attention layers")


def _moe_fields(hf: dict, num_layers: int, problems: List[str]) -> dict:
    num_experts = hf.get("num_experts", hf.get("num_local_experts"))
    if not num_experts:
        problems.append("no `num_experts` in config.json")
        return {}
    if not hf.get("norm_topk_prob", False):
        problems.append("norm_topk_prob=false (Megatron's softmax router renormalises the top-k probabilities)")
    if hf.get("decoder_sparse_step", 1) != 1:
        problems.append(f"decoder_sparse_step={hf['decoder_sparse_step']} (only every-layer MoE is supported)")
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))) or len(dense) >= num_layers:
        problems.append(f"mlp_only_layers={dense} (only a prefix of dense layers is supported)")
    if hf.get("shared_expert_intermediate_size"):
        problems.append("shared experts")
    return dict(
        num_experts=int(num_experts),
        moe_router_topk=int(hf.get("num_experts_per_tok", 2)),
        moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
        moe_first_dense_layers=len(dense),
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 1e-3)),
    )


def model_config_from_hf(hf: dict) -> Tuple[Architecture, ModelConfig]:
    """Our :class:`ModelConfig` for an HF ``config.json`` (``vocab_size`` = the HF embedding rows).

    Raises one :class:`ConvertError` listing every feature that cannot be represented.
    """
    arch = detect_architecture(hf)
    problems: List[str] = []
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        problems.append(f"hidden_act `{hf.get('hidden_act')}` (only SwiGLU with silu)")
    if arch.model_type != "qwen2" and hf.get("attention_bias"):
        problems.append("attention_bias=true (Megatron has a QKV bias but no output-projection bias)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true")
    _check_full_attention(hf, problems)
    rope = _rope_fields(hf, problems)
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        fields = dict(
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(hf["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            kv_channels=int(hf.get("head_dim") or hidden // heads),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            **rope,
            normalization="RMSNorm",
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            activation="swiglu",
            qk_layernorm=arch.qk_norm,
            add_qkv_bias=arch.qkv_bias,
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
            init_method_std=float(hf.get("initializer_range", 0.02)),
        )
        if arch.moe:
            fields.update(_moe_fields(hf, fields["num_layers"], problems))
    except KeyError as err:
        raise ConvertError(f"config.json of this {arch.model_type} model lacks {err}; "
                           "it is incomplete or not a Hugging Face config") from None
    if problems:
        raise ConvertError(f"this {arch.model_type} checkpoint uses features the conversion cannot represent "
                           f"exactly: {'; '.join(problems)}")
    return arch, ModelConfig(**fields)


def architecture_of_model(m: ModelConfig) -> Architecture:
    """The HF architecture that represents our model exactly (for export without a template)."""
    if m.num_experts:
        arch = ARCHITECTURES["qwen3_moe"]
    elif m.qk_layernorm:
        arch = ARCHITECTURES["qwen3"]
    elif m.add_qkv_bias:
        arch = ARCHITECTURES["qwen2"]
    else:
        arch = ARCHITECTURES["llama"]
    _check_exportable(m, arch)
    return arch


def _check_exportable(m: ModelConfig, arch: Architecture) -> None:
    problems = []
    if m.normalization != "RMSNorm" or m.activation != "swiglu":
        problems.append(f"{m.normalization}/{m.activation} (HF {arch.model_type} needs RMSNorm/swiglu)")
    if m.qk_layernorm != arch.qk_norm:
        problems.append(f"qk_layernorm={m.qk_layernorm} (HF {arch.model_type} has {arch.qk_norm})")
    if m.add_qkv_bias != arch.qkv_bias:
        problems.append(f"add_qkv_bias={m.add_qkv_bias} (HF {arch.model_type} has {arch.qkv_bias})")
    if bool(m.num_experts) != arch.moe:
        problems.append(f"num_experts={m.num_experts} (HF {arch.model_type} is {'MoE' if arch.moe else 'dense'})")
    if m.num_experts:
        if m.moe_shared_expert_intermediate_size:
            problems.append("shared experts")
        if m.moe_router_score_function != "softmax" or m.moe_router_enable_expert_bias:
            problems.append("a sigmoid / expert-bias router")
    if problems:
        raise ConvertError(f"the model cannot be exported as HF `{arch.model_type}`: {'; '.join(problems)}; "
                           f"supported: {_SUPPORTED}")


def hf_config_from_model(
    m: ModelConfig,
    vocab_size: int,
    template: Optional[dict] = None,
    dtype: str = "float32",
    eos_token_id: Optional[int] = None,
) -> Tuple[Architecture, dict]:
    """An HF ``config.json`` for our model; ``template`` (an original config.json) keeps its other fields.

    Written with the long-standing key names (``rope_theta``, ``num_experts``) unless
    the template uses the newer ones, so that transformers 4.x and 5.x both load it.
    """
    arch = detect_architecture(template) if template else architecture_of_model(m)
    _check_exportable(m, arch)
    out = dict(template or {})
    heads = m.num_attention_heads
    out.update(
        architectures=[arch.hf_class],
        model_type=arch.model_type,
        vocab_size=int(vocab_size),
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size or 4 * m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=m.num_query_groups or heads,
        head_dim=m.kv_channels or m.hidden_size // heads,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
    )
    out["dtype" if "dtype" in out else "torch_dtype"] = dtype  # transformers 5 / 4 spelling
    scaling = None
    if m.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", **{k: getattr(m, ours) for k, ours in LLAMA3_SCALING_KEYS.items()}}
    if isinstance(out.get("rope_parameters"), dict):
        out["rope_parameters"] = {**out["rope_parameters"], **(scaling or {"rope_type": "default"}),
                                  "rope_theta": m.rotary_base}
    else:
        out["rope_theta"] = m.rotary_base
        out["rope_scaling"] = scaling
    if arch.model_type in ("llama", "qwen3", "qwen3_moe"):
        out["attention_bias"] = False
    if arch.model_type == "llama":
        out["mlp_bias"] = False
    else:
        out["use_sliding_window"] = False
    if arch.moe:
        out["num_local_experts" if "num_local_experts" in out else "num_experts"] = m.num_experts
        out.update(
            num_experts_per_tok=m.moe_router_topk,
            moe_intermediate_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(m.moe_first_dense_layers)),
        )
    if eos_token_id is not None and out.get("eos_token_id") is None:
        out["eos_token_id"] = eos_token_id
    return arch, out


# ----------------------------------------------------------------------------- tensor slots


@dataclass(frozen=True)
class Slot:
    """The HF tensors one global Megatron parameter is made of, and how (``kind``).

    ``copy``: the tensor itself; ``qkv``: q, k, v fused per query group; ``glu``:
    ``cat(gate, up)``; ``vocab``: embedding / output rows (padded in Megatron).
    """

    hf: Tuple[str, ...]
    kind: str


def model_slots(arch: Architecture, m: ModelConfig) -> Dict[str, Slot]:
    """Canonical Megatron name (global layer and expert numbers) -> :class:`Slot`, for the whole model."""
    slots: Dict[str, Slot] = {EMBEDDING_KEY: Slot(("model.embed_tokens.weight",), "vocab")}
    for layer in range(m.num_layers):
        hf = f"model.layers.{layer}."
        mg = f"decoder.layers.{layer}."
        attn = hf + "self_attn."
        slots[mg + "input_layernorm.weight"] = Slot((hf + "input_layernorm.weight",), "copy")
        slots[mg + "self_attention.linear_qkv.weight"] = Slot(
            tuple(f"{attn}{p}_proj.weight" for p in "qkv"), "qkv")
        if arch.qkv_bias:
            slots[mg + "self_attention.linear_qkv.bias"] = Slot(tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv")
        slots[mg + "self_attention.linear_proj.weight"] = Slot((attn + "o_proj.weight",), "copy")
        if arch.qk_norm:
            slots[mg + "self_attention.q_layernorm.weight"] = Slot((attn + "q_norm.weight",), "copy")
            slots[mg + "self_attention.k_layernorm.weight"] = Slot((attn + "k_norm.weight",), "copy")
        slots[mg + "pre_mlp_layernorm.weight"] = Slot((hf + "post_attention_layernorm.weight",), "copy")
        if arch.moe and layer >= m.moe_first_dense_layers:
            slots[mg + "mlp.router.weight"] = Slot((hf + "mlp.gate.weight",), "copy")
            for e in range(m.num_experts or 0):
                ex = f"{hf}mlp.experts.{e}."
                slots[f"{mg}mlp.experts.{e}.linear_fc1.weight"] = Slot(
                    (ex + "gate_proj.weight", ex + "up_proj.weight"), "glu")
                slots[f"{mg}mlp.experts.{e}.linear_fc2.weight"] = Slot((ex + "down_proj.weight",), "copy")
        else:
            slots[mg + "mlp.linear_fc1.weight"] = Slot((hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), "glu")
            slots[mg + "mlp.linear_fc2.weight"] = Slot((hf + "mlp.down_proj.weight",), "copy")
    slots["decoder.final_layernorm.weight"] = Slot(("model.norm.weight",), "copy")
    # tied: Megatron still has output_layer.weight on the last pipeline stage (a copy of the embedding)
    head = "lm_head.weight" if m.untie_embeddings_and_output_weights else "model.embed_tokens.weight"
    slots["output_layer.weight"] = Slot((head,), "vocab")
    return slots


def hf_tensor_names(slots: Dict[str, Slot]) -> List[str]:
    """Every HF tensor of the model, in model order, once."""
    return list(dict.fromkeys(name for s in slots.values() for name in s.hf))


def _head_dim(m: ModelConfig) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF q/k/v projections (weights ``[n*d, h]`` or biases ``[n*d]``) -> Megatron's interleaved ``linear_qkv``."""
    d = k.shape[0] // num_groups
    rest = tuple(q.shape[1:])
    per = num_heads // num_groups
    parts = (q.reshape(num_groups, per * d, *rest), k.reshape(num_groups, d, *rest), v.reshape(num_groups, d, *rest))
    return torch.cat(parts, dim=1).reshape(num_groups * (per + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    per = num_heads // num_groups
    d = qkv.shape[0] // (num_groups * (per + 2))
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(num_groups, (per + 2) * d, *rest)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return (q.reshape(num_heads * d, *rest), k.reshape(num_groups * d, *rest), v.reshape(num_groups * d, *rest))


def to_megatron(slot: Slot, tensors: Sequence[torch.Tensor], m: ModelConfig) -> torch.Tensor:
    """The global (TP-unsplit, unpadded) Megatron tensor of a non-``vocab`` slot."""
    if slot.kind == "qkv":
        return fuse_qkv(*tensors, m.num_attention_heads, m.num_query_groups or m.num_attention_heads)
    if slot.kind == "glu":
        return torch.cat(list(tensors), dim=0)
    if slot.kind == "copy":
        return tensors[0]
    raise ValueError(f"slot kind `{slot.kind}` has no direct conversion")


def to_hf(slot: Slot, tensor: torch.Tensor, m: ModelConfig, vocab_size: int) -> Dict[str, torch.Tensor]:
    """HF tensors of one global Megatron tensor (``vocab``: padding rows stripped)."""
    if slot.kind == "qkv":
        return dict(zip(slot.hf, split_qkv(tensor, m.num_attention_heads, m.num_query_groups or m.num_attention_heads)))
    if slot.kind == "glu":
        return dict(zip(slot.hf, tensor.chunk(2, dim=0)))
    if slot.kind == "vocab":
        return {slot.hf[0]: tensor[:vocab_size]}
    return {slot.hf[0]: tensor}


def tp_shard(tensor: torch.Tensor, kind: str, dim: int, rank: int, size: int) -> torch.Tensor:
    """This TP rank's part of a global tensor (contiguous split; each half separately for ``glu``)."""
    if size == 1:
        return tensor
    halves = tensor.chunk(2, dim=0) if kind == "glu" else (tensor,)
    out = []
    for part in halves:
        if part.shape[dim] % size:
            raise ConvertError(f"dimension {dim} of size {part.shape[dim]} cannot be split over {size} "
                               "tensor-parallel ranks; pick a TP size that divides it")
        out.append(part.chunk(size, dim=dim)[rank])
    return torch.cat(out, dim=0) if len(out) > 1 else out[0]


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_TE_GROUPED = re.compile(r"mlp\.experts\.linear_fc([12])\.weight(\d+)")
_LOCAL_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.+)")
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def canonical_name(name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """Our model's parameter name (local spec or TE spec, local layer/expert numbers) -> canonical name.

    ``layer_offset``: global number of this pipeline chunk's first layer;
    ``expert_offset``: global number of this expert-parallel rank's first expert.
    """
    m = _LAYER.fullmatch(name)
    if not m:
        return name
    layer, rest = int(m.group(1)) + layer_offset, m.group(2)
    rest = _TE_FUSED_NORMS.get(rest, rest)
    grouped = _TE_GROUPED.fullmatch(rest)
    if grouped:
        rest = f"mlp.experts.local_experts.{grouped.group(2)}.linear_fc{grouped.group(1)}.weight"
    local = _LOCAL_EXPERT.fullmatch(rest)
    if local:
        rest = f"mlp.experts.{int(local.group(1)) + expert_offset}.{local.group(2)}"
    elif rest.startswith("mlp.experts.weight"):
        raise ConvertError("legacy grouped-GEMM expert weights (mlp.experts.weight1/2) are not supported; "
                           "build the model without moe_use_legacy_grouped_gemm")
    return f"decoder.layers.{layer}.{rest}"


def is_expert_param(canonical: str) -> bool:
    """Routed-expert weights are split over the expert-TP group, everything else over TP."""
    return re.search(r"\.mlp\.experts\.\d+\.", canonical) is not None


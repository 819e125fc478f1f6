"""The valid range of every numeric config field, checked before anything starts.

One table instead of scattered ``if x < 0`` checks: a value outside its range
(a negative learning rate, a zero interval, a top-k of 0) would otherwise reach
torch or Megatron and fail inside every rank with a traceback, or be read as
"not set" by an ``x or default``.  ``None`` is allowed where the field is
optional; NaN and infinities never pass.  Cross-field rules (divisibility,
``min_lr <= lr``) are here too when they only compare numbers.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

from .schema import Config

__all__ = ["RANGES", "range_problems"]

# field -> interval in the usual notation ("inf" = unbounded); "(0, inf)" means > 0
RANGES: Tuple[Tuple[str, str], ...] = (
    ("model.num_layers", "[1, inf)"),
    ("model.hidden_size", "[1, inf)"),
    ("model.ffn_hidden_size", "[1, inf)"),
    ("model.num_attention_heads", "[1, inf)"),
    ("model.num_query_groups", "[1, inf)"),
    ("model.kv_channels", "[1, inf)"),
    ("model.vocab_size", "[1, inf)"),
    ("model.make_vocab_size_divisible_by", "[1, inf)"),
    ("model.max_position_embeddings", "[1, inf)"),
    ("model.rotary_base", "(0, inf)"),
    ("model.norm_epsilon", "(0, 1)"),
    ("model.init_method_std", "(0, inf)"),
    ("model.num_experts", "[1, inf)"),
    ("model.moe_ffn_hidden_size", "[1, inf)"),
    ("model.moe_shared_expert_intermediate_size", "[1, inf)"),
    ("model.moe_aux_loss_coeff", "[0, inf)"),
    ("model.moe_first_dense_layers", "[0, inf)"),
    ("diffusion.mask_id", "[0, inf)"),
    ("diffusion.embedding_noise_std", "[0, inf)"),
    ("diffusion.embedding_noise_steps", "[0, inf)"),
    ("data.seed", "[0, inf)"),
    ("train.train_steps", "[1, inf)"),
    ("train.lr", "[0, inf)"),  # 0 is legitimate: determinism checks, resuming without changing weights
    ("train.min_lr", "[0, inf)"),
    ("train.lr_warmup_steps", "[0, inf)"),
    ("train.lr_wsd_decay_steps", "[1, inf)"),
    ("train.weight_decay", "[0, inf)"),
    ("train.adam_beta1", "[0, 1)"),
    ("train.adam_beta2", "[0, 1)"),
    ("train.adam_eps", "(0, inf)"),
    ("train.clip_grad", "[0, inf)"),
    ("train.seed", "[0, inf)"),
    ("checkpoint.save_interval", "[0, inf)"),
    ("checkpoint.keep_last", "[0, inf)"),
    ("checkpoint.keep_best", "[0, inf)"),
    ("logging.log_interval", "[1, inf)"),
    ("logging.eval_interval", "[0, inf)"),
    ("logging.eval_iters", "[1, inf)"),
    ("logging.peak_tflops", "(0, inf)"),
    ("sft.cap_lambda", "[0, inf)"),
    ("dpo.beta", "(0, inf)"),
    ("dpo.lr", "[0, inf)"),
    ("rl.group_size", "[2, inf)"),  # GRPO advantages compare rollouts of one prompt
    ("rl.groups_per_step", "[1, inf)"),
    ("rl.max_oversample", "[1, inf)"),
    ("rl.block_size", "[1, inf)"),
    ("rl.threshold", "[0, inf)"),  # > 1 turns the confidence threshold off
    ("rl.temperature", "[0, inf)"),
    ("rl.top_p", "(0, 1]"),
    ("rl.max_new_tokens", "[1, inf)"),
    ("rl.max_steps_per_block", "[1, inf)"),
    ("rl.eps_low", "[0, 1)"),
    ("rl.eps_high", "[0, inf)"),
    ("rl.kl_coef", "[0, inf)"),
    ("rl.entropy_coef", "[0, inf)"),
    ("rl.max_forwards", "[1, inf)"),
    ("rl.correctness_weight", "[0, inf)"),
    ("rl.format_weight", "[0, inf)"),
)


def _get(cfg: Config, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _within(value: float, interval: str) -> bool:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value > lo if interval[0] == "(" else value >= lo
    below = value < hi if interval[-1] == ")" else value <= hi
    return math.isfinite(value) and above and below


def _describe(interval: str) -> str:
    lo, hi = (x.strip() for x in interval[1:-1].split(","))
    if hi == "inf":
        return f"> {lo}" if interval[0] == "(" else f">= {lo}"
    return f"in {interval}"


def range_problems(cfg: Config) -> list[str]:
    """One line per numeric field outside its range, naming the field, the value and the range."""
    out = []
    for path, interval in RANGES:
        value = _get(cfg, path)
        if value is not None and not _within(float(value), interval):
            section, name = path.split(".")
            optional = " (or unset)" if name in _OPTIONAL.get(section, ()) else ""
            out.append(f"{path}={value} is out of range: it must be {_describe(interval)}{optional}")
    t, m = cfg.train, cfg.model
    if not out and t.min_lr > t.lr:
        out.append(f"train.min_lr={t.min_lr} is above train.lr={t.lr}; the schedule decays from lr to min_lr")
    if not out and m.moe_first_dense_layers >= m.num_layers and m.num_experts is not None:
        out.append(f"model.moe_first_dense_layers={m.moe_first_dense_layers} leaves no MoE layer of "
                   f"model.num_layers={m.num_layers}")
    for i, phase in enumerate(cfg.diffusion.block_schedule):
        if len(phase) == 2 and phase[1] < 1:
            out.append(f"diffusion.block_schedule[{i}]: phase length {phase[1]} must be >= 1 "
                       f"{cfg.diffusion.block_schedule_unit}")
    return out


def _optional_fields() -> dict:
    """Fields whose default is None (unset is valid for them), by section."""
    import dataclasses

    defaults = Config()
    return {s.name: {f.name for f in dataclasses.fields(getattr(defaults, s.name))
                     if getattr(getattr(defaults, s.name), f.name) is None}
            for s in dataclasses.fields(defaults) if dataclasses.is_dataclass(getattr(defaults, s.name))}


_OPTIONAL = _optional_fields()

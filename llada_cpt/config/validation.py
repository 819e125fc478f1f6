"""Cross-field checks; every mistake found is reported on its own line with the fix."""
from __future__ import annotations

from typing import Optional

from ..errors import ConfigError
from .ranges import range_problems
from .schema import Config

BACKENDS = ("reference", "flex", "cudnn", "te", "auto")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
CROSS_ENTROPY_IMPLS = ("auto", "chunked", "megatron")  # model.fused_cross_entropy
LR_STYLES = ("constant", "linear", "cosine", "WSD")
DPO_REFERENCES = ("model", "precomputed")


def _post_training_problems(cfg: Config) -> list[str]:
    """Checks of the ``sft`` / ``dpo`` section of the stage being run."""
    if cfg.stage not in ("sft", "dpo"):
        return []
    from ..data.chat import TEMPLATES
    from ..data.sft import OVERLONG_POLICIES

    name = cfg.stage
    s = getattr(cfg, name)
    out: list[str] = []
    if not (s.data or cfg.data.sft_data or cfg.data.demo):
        out.append(f"no {name.upper()} data: set {name}.data=[file.jsonl] (or data.sft_data), "
                   "or data.demo=true for the bundled demo set")
    if s.chat_template not in TEMPLATES:
        out.append(f"{name}.chat_template `{s.chat_template}` is not one of {', '.join(TEMPLATES)}")
    if s.overlong not in OVERLONG_POLICIES:
        out.append(f"{name}.overlong `{s.overlong}` is not one of {', '.join(OVERLONG_POLICIES)}")
    if not 0 < s.valid_fraction < 1:
        out.append(f"{name}.valid_fraction={s.valid_fraction} must be in (0, 1)")
    L = cfg.data.seq_length
    if s.block_size is not None and (s.block_size < 1 or L % s.block_size):
        out.append(f"{name}.block_size={s.block_size} does not divide data.seq_length={L}; use a divisor of {L}")
    if name == "sft" and s.cap_lambda is not None and s.cap_lambda < 0:
        out.append(f"sft.cap_lambda={s.cap_lambda} must be >= 0 (or null to turn CAP off)")
    if name == "dpo":
        if s.beta <= 0:
            out.append(f"dpo.beta={s.beta} must be > 0")
        if s.reference not in DPO_REFERENCES:
            out.append(f"dpo.reference `{s.reference}` is not one of {', '.join(DPO_REFERENCES)}")
        if s.lr is not None and s.lr <= 0:
            out.append(f"dpo.lr={s.lr} must be > 0 (or null for the SFT checkpoint's final rate)")
        d = cfg.diffusion
        if d.embedding_noise_steps > 0 and d.embedding_noise_std > 0:
            out.append("DPO compares policy and reference on identical inputs: set "
                       "diffusion.embedding_noise_steps=0 (masked-embedding noise is for CPT)")
    return out


def _rl_problems(cfg: Config) -> list[str]:
    """Checks of the ``rl`` section: one set of chat-template names for every stage and tool, dynamic sampling."""
    from ..data.chat import TEMPLATES
    from ..rl.dynamic_sampling import CRITERIA

    r, out = cfg.rl, []
    if r.chat_template not in TEMPLATES:
        out.append(f"rl.chat_template `{r.chat_template}` is not one of {', '.join(TEMPLATES)}")
    modes = CRITERIA + ("none",)
    if r.dynamic_sampling not in modes:
        out.append(f"rl.dynamic_sampling `{r.dynamic_sampling}` is not one of {', '.join(modes)} (accuracy: drop "
                   "groups whose accuracy is 0 or 1, DAPO; reward_std: drop groups whose rewards are all equal)")
    d = cfg.diffusion
    if d.embedding_noise_steps > 0 and d.embedding_noise_std > 0:
        out.append("RL trains on the exact contexts the sampler saw (PPO ratios against its log-probs): set "
                   "diffusion.embedding_noise_steps=0 (masked-embedding noise is for CPT and SFT)")
    return out


def _problems(cfg: Config, world_size: Optional[int]) -> list[str]:
    m, p, d, t, data = cfg.model, cfg.parallel, cfg.diffusion, cfg.train, cfg.data
    out: list[str] = []
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                      p.context_parallel_size, p.expert_model_parallel_size)
    for name, v in (("tensor", tp), ("pipeline", pp), ("context", cp), ("expert", ep)):
        if v < 1:
            out.append(f"parallel.{name}_model_parallel_size must be >= 1, got {v}")
    out += range_problems(cfg)  # before the cross-field checks, which divide by these numbers
    if out:
        return out
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % tp:
        out.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                   f"parallel.tensor_model_parallel_size={tp}; pick a TP size that divides the head count")
    if m.num_attention_heads % groups:
        out.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                   f"model.num_query_groups={groups}")
    elif groups % tp:
        out.append(f"model.num_query_groups={groups} is not divisible by parallel.tensor_model_parallel_size={tp}")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        out.append(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
                   f"{m.num_attention_heads}; set model.kv_channels explicitly")
    if m.num_layers % pp:
        out.append(f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline_model_parallel_size={pp}")
    if m.rope_scaling not in (None, "llama3"):
        out.append(f"model.rope_scaling={m.rope_scaling!r} is not supported; use llama3 (Llama 3.1+) or leave it unset")
    elif m.rope_scaling and not (m.rope_scaling_factor > 0 and 0 < m.rope_low_freq_factor < m.rope_high_freq_factor
                                 and m.rope_original_max_position_embeddings > 0):
        out.append("model.rope_scaling=llama3 needs rope_scaling_factor > 0, 0 < rope_low_freq_factor < "
                   "rope_high_freq_factor and rope_original_max_position_embeddings > 0 (Llama 3.1: 8, 1, 4, 8192)")
    if m.num_experts is None and ep > 1:
        out.append(f"parallel.expert_model_parallel_size={ep} needs an MoE model (model.num_experts)")
    if m.num_experts is not None:
        if m.num_experts % ep:
            out.append(f"model.num_experts={m.num_experts} is not divisible by parallel.expert_model_parallel_size={ep}")
        if not 1 <= m.moe_router_topk <= m.num_experts:
            out.append(f"model.moe_router_topk={m.moe_router_topk} must be in [1, num_experts={m.num_experts}]")
        if tp > 1 and not p.sequence_parallel:
            out.append(f"an MoE model with parallel.tensor_model_parallel_size={tp} needs "
                       "parallel.sequence_parallel=true (Megatron-Core's MoE layer refuses tensor parallelism "
                       "without it in training; it needs Transformer Engine on GPU); or shard the experts with "
                       "parallel.expert_model_parallel_size and keep tensor_model_parallel_size=1")
    if m.attention_backend not in BACKENDS:
        out.append(f"model.attention_backend `{m.attention_backend}` is not one of {', '.join(BACKENDS)}")
    for name, choices in (("transformer_impl", TRANSFORMER_IMPLS), ("fused_cross_entropy", CROSS_ENTROPY_IMPLS)):
        if getattr(m, name) not in choices:
            out.append(f"model.{name} `{getattr(m, name)}` is not one of {', '.join(choices)}")
    if m.fused_cross_entropy == "chunked" and p.sequence_parallel:
        out.append("model.fused_cross_entropy=chunked does not support parallel.sequence_parallel "
                   "(the head's input is split along the sequence); set it to auto or megatron")
    if p.sequence_parallel and tp == 1:
        out.append("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
    L = data.seq_length
    if L < 1:
        out.append(f"data.seq_length must be positive, got {L}")
    elif L % (2 * cp):
        out.append(f"data.seq_length={L} must be divisible by 2 * context_parallel_size = {2 * cp} (zig-zag chunks)")
    if L > m.max_position_embeddings:
        out.append(f"data.seq_length={L} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    for i, phase in enumerate(d.block_schedule):
        if len(phase) != 2:
            out.append(f"diffusion.block_schedule[{i}]={phase} must be [block_size, amount]")
        elif phase[0] < 1 or L % phase[0] or phase[0] > L:
            out.append(f"diffusion.block_schedule[{i}]: block size {phase[0]} does not divide data.seq_length={L}; "
                       f"use a divisor of {L}")
    if d.reference_block_size is not None and (d.reference_block_size < 1 or L % d.reference_block_size):
        out.append(f"diffusion.reference_block_size={d.reference_block_size} does not divide data.seq_length={L}")
    if not 0 < d.mask_ratio_min <= d.mask_ratio_max <= 1:
        out.append(f"diffusion mask ratio band [{d.mask_ratio_min}, {d.mask_ratio_max}] must satisfy "
                   "0 < mask_ratio_min <= mask_ratio_max <= 1")
    if d.embedding_noise_decay not in ("linear", "cosine"):
        out.append(f"diffusion.embedding_noise_decay must be linear or cosine, got `{d.embedding_noise_decay}`")
    if t.lr_decay_style not in LR_STYLES:
        out.append(f"train.lr_decay_style `{t.lr_decay_style}` is not one of {', '.join(LR_STYLES)}")
    if t.precision not in ("auto", "fp32", "bf16"):
        out.append(f"train.precision must be auto, fp32 or bf16, got `{t.precision}`")
    if t.nan_policy not in ("skip", "stop"):
        out.append(f"train.nan_policy must be skip or stop, got `{t.nan_policy}`")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        out.append("train.micro_batch_size and train.global_batch_size must be >= 1")
    if cfg.stage == "rl":
        wrong = sorted({p[0] for p in d.block_schedule if len(p) == 2 and p[0] != cfg.rl.block_size})
        if wrong:
            out.append(f"the training block size {wrong[0]} (diffusion.block_schedule) differs from the rollout block "
                       f"size rl.block_size={cfg.rl.block_size}; trajectories would be trained on contexts the sampler "
                       f"never saw. Set diffusion.block_schedule=[[{cfg.rl.block_size}, 1]] or change rl.block_size")
        out += _rl_problems(cfg)
    if world_size is not None and not out:
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            out.append(f"{world_size} processes cannot be split into tensor({tp}) x pipeline({pp}) x context({cp}) "
                       f"= {model_parallel}; launch a multiple of {model_parallel} processes or change parallel.*")
        else:
            dp = world_size // model_parallel
            if t.global_batch_size % (t.micro_batch_size * dp):
                out.append(f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x "
                           f"data-parallel size = {t.micro_batch_size} x {dp}")
            if ep > 1 and (dp * cp) % ep:
                out.append(f"parallel.expert_model_parallel_size={ep} must divide data x context parallel size "
                           f"= {dp * cp}")
    if not (data.demo or data.train_data or cfg.stage != "cpt"):
        out.append("no training data: set data.train_data (indexed dataset prefixes) or data.demo=true")
    out += _post_training_problems(cfg)
    return out


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Raise :class:`ConfigError` listing every problem; return ``cfg`` when valid."""
    problems = _problems(cfg, world_size)
    if problems:
        if len(problems) == 1:
            raise ConfigError(problems[0])
        raise ConfigError(f"{len(problems)} problems in the config:\n  - " + "\n  - ".join(problems))
    return cfg

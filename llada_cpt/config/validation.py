"""Cross-field checks; every mistake found is reported on its own line with the fix."""
from __future__ import annotations

from typing import Optional

from ..errors import ConfigError
from .choices import choice_problems
from .ranges import range_problems
from .schema import Config


def _parallel_problems(cfg: Config) -> list[str]:
    p = cfg.parallel
    sizes = (("tensor", p.tensor_model_parallel_size), ("pipeline", p.pipeline_model_parallel_size),
             ("context", p.context_parallel_size), ("expert", p.expert_model_parallel_size))
    return [f"parallel.{name}_model_parallel_size must be >= 1, got {v}" for name, v in sizes if v < 1]


def _model_problems(cfg: Config) -> list[str]:
    """Shapes against the parallel sizes, RoPE scaling, MoE, the LM head with sequence parallelism."""
    m, p, out = cfg.model, cfg.parallel, []
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
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
    if m.rope_scaling and not (m.rope_scaling_factor > 0 and 0 < m.rope_low_freq_factor < m.rope_high_freq_factor
                               and m.rope_original_max_position_embeddings > 0):
        out.append("model.rope_scaling=llama3 needs rope_scaling_factor > 0, 0 < rope_low_freq_factor < "
                   "rope_high_freq_factor and rope_original_max_position_embeddings > 0 (Llama 3.1: 8, 1, 4, 8192)")
    if m.num_experts is None and ep > 1:
        out.append(f"parallel.expert_model_parallel_size={ep} needs an MoE model (model.num_experts)")
    if m.num_experts is not None:
        if m.num_experts % ep:
            out.append(f"model.num_experts={m.num_experts} is not divisible by "
                       f"parallel.expert_model_parallel_size={ep}")
        if not 1 <= m.moe_router_topk <= m.num_experts:
            out.append(f"model.moe_router_topk={m.moe_router_topk} must be in [1, num_experts={m.num_experts}]")
        if tp > 1 and not p.sequence_parallel:
            out.append(f"an MoE model with parallel.tensor_model_parallel_size={tp} needs "
                       "parallel.sequence_parallel=true (Megatron-Core's MoE layer refuses tensor parallelism "
                       "without it in training; it needs Transformer Engine on GPU); or shard the experts with "
                       "parallel.expert_model_parallel_size and keep tensor_model_parallel_size=1")
    if m.fused_cross_entropy == "chunked" and p.sequence_parallel:
        out.append("model.fused_cross_entropy=chunked does not support parallel.sequence_parallel "
                   "(the head's input is split along the sequence); set it to auto or megatron")
    if p.sequence_parallel and tp == 1:
        out.append("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
    return out


def _data_problems(cfg: Config) -> list[str]:
    """The sequence length against context parallelism and the model's positions."""
    L, cp, out = cfg.data.seq_length, cfg.parallel.context_parallel_size, []
    if L < 1:
        out.append(f"data.seq_length must be positive, got {L}")
    elif L % (2 * cp):
        out.append(f"data.seq_length={L} must be divisible by 2 * context_parallel_size = {2 * cp} (zig-zag chunks)")
    if L > cfg.model.max_position_embeddings:
        out.append(f"data.seq_length={L} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}")
    return out


def _diffusion_problems(cfg: Config) -> list[str]:
    """Block sizes that divide the sequence, the mask-ratio band."""
    d, L, out = cfg.diffusion, cfg.data.seq_length, []
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
    return out


def _train_problems(cfg: Config) -> list[str]:
    t = cfg.train
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        return ["train.micro_batch_size and train.global_batch_size must be >= 1"]
    return []


def _rl_problems(cfg: Config) -> list[str]:
    """Checks of ``llada-cpt rl``: the rollout block size is the training one, no masked-embedding noise."""
    if cfg.stage != "rl":
        return []
    d, r, out = cfg.diffusion, cfg.rl, []
    wrong = sorted({p[0] for p in d.block_schedule if len(p) == 2 and p[0] != r.block_size})
    if wrong:
        out.append(f"the training block size {wrong[0]} (diffusion.block_schedule) differs from the rollout block "
                   f"size rl.block_size={r.block_size}; trajectories would be trained on contexts the sampler "
                   f"never saw. Set diffusion.block_schedule=[[{r.block_size}, 1]] or change rl.block_size")
    if d.embedding_noise_steps > 0 and d.embedding_noise_std > 0:
        out.append("RL trains on the exact contexts the sampler saw (PPO ratios against its log-probs): set "
                   "diffusion.embedding_noise_steps=0 (masked-embedding noise is for CPT and SFT)")
    return out


def _world_problems(cfg: Config, world_size: int) -> list[str]:
    """The process count against the model-parallel sizes and the batch sizes."""
    p, t, out = cfg.parallel, cfg.train, []
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                      p.context_parallel_size, p.expert_model_parallel_size)
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        return [f"{world_size} processes cannot be split into tensor({tp}) x pipeline({pp}) x context({cp}) "
                f"= {model_parallel}; launch a multiple of {model_parallel} processes or change parallel.*"]
    dp = world_size // model_parallel
    if t.global_batch_size % (t.micro_batch_size * dp):
        out.append(f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x "
                   f"data-parallel size = {t.micro_batch_size} x {dp}")
    if ep > 1 and (dp * cp) % ep:
        out.append(f"parallel.expert_model_parallel_size={ep} must divide data x context parallel size "
                   f"= {dp * cp}")
    return out


def _post_training_problems(cfg: Config) -> list[str]:
    """Checks of the ``sft`` / ``dpo`` section of the stage being run."""
    if cfg.stage not in ("sft", "dpo"):
        return []
    name = cfg.stage
    s = getattr(cfg, name)
    out: list[str] = []
    if not (s.data or cfg.data.sft_data or cfg.data.demo):
        out.append(f"no {name.upper()} data: set {name}.data=[file.jsonl] (or data.sft_data), "
                   "or data.demo=true for the bundled demo set")
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
        if s.lr is not None and s.lr < 0:
            out.append(f"dpo.lr={s.lr} must be >= 0 (or null for the SFT checkpoint's final rate)")
        d = cfg.diffusion
        if d.embedding_noise_steps > 0 and d.embedding_noise_std > 0:
            out.append("DPO compares policy and reference on identical inputs: set "
                       "diffusion.embedding_noise_steps=0 (masked-embedding noise is for CPT)")
    return out


def _problems(cfg: Config, world_size: Optional[int]) -> list[str]:
    # sizes and ranges first: the cross-field checks divide by these numbers
    out = _parallel_problems(cfg) + range_problems(cfg) + choice_problems(cfg)
    if out:
        return out
    out = (_model_problems(cfg) + _data_problems(cfg) + _diffusion_problems(cfg) + _train_problems(cfg)
           + _rl_problems(cfg))
    if world_size is not None and not out:
        out += _world_problems(cfg, world_size)
    if not (cfg.data.demo or cfg.data.train_data or cfg.stage != "cpt"):
        out.append("no training data: set data.train_data (indexed dataset prefixes) or data.demo=true")
    return out + _post_training_problems(cfg)


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Raise :class:`ConfigError` listing every problem; return ``cfg`` when valid."""
    problems = _problems(cfg, world_size)
    if problems:
        if len(problems) == 1:
            raise ConfigError(problems[0])
        raise ConfigError(f"{len(problems)} problems in the config:\n  - " + "\n  - ".join(problems))
    return cfg

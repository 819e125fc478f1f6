"""Typed configuration tree.  Field names follow Megatron-LM arguments where one exists.

Every choice is a ``Literal``: the loader checks values against it (one line with
the allowed values and the closest match), and code that needs the list reads it
with ``typing.get_args`` -- the annotation is the one place the names are kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

Stage = Literal["cpt", "sft", "dpo", "rl"]
AttentionBackend = Literal["reference", "flex", "cudnn", "te", "auto"]
TransformerImpl = Literal["auto", "local", "transformer_engine"]
CrossEntropyImpl = Literal["auto", "chunked", "megatron"]
ChatTemplate = Literal["auto", "tokenizer", "plain", "chatml", "raw"]
OverlongPolicy = Literal["drop", "truncate", "error"]
DynamicSampling = Literal["accuracy", "reward_std", "none"]


@dataclass
class ModelConfig:
    """Architecture of the Megatron-Core ``GPTModel`` (dense or MoE)."""

    preset: Optional[str] = None  # named size from llada_cpt.config.presets; explicit fields override it
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden (dense); SwiGLU presets set it
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; None = MHA
    kv_channels: Optional[int] = None  # head dim; None = hidden / heads
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    # Llama 3.1+ RoPE scaling (HF rope_type "llama3"); None = plain RoPE
    rope_scaling: Optional[Literal["llama3"]] = None
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-6
    activation: Literal["swiglu", "gelu"] = "swiglu"
    qk_layernorm: bool = False  # Qwen3
    add_qkv_bias: bool = False  # Qwen2
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    attention_backend: AttentionBackend = "reference"
    # layer modules: local (Megatron-Core's torch modules) | transformer_engine (TE: fused norm+linear,
    # grouped GEMM; NGC image) | auto (TE where importable and on GPU)
    transformer_impl: TransformerImpl = "auto"
    # LM head + cross entropy: chunked (over tokens, no materialised logits) | megatron (logits, then
    # Megatron's cross entropy) | auto (chunked on GPU without sequence parallelism)
    fused_cross_entropy: CrossEntropyImpl = "auto"
    recompute_granularity: Optional[Literal["full", "selective"]] = None  # full: every layer; selective: core attention
    # MoE (Megatron-Core MoE layer); num_experts None = dense
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_grouped_gemm: bool = False
    moe_router_load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    moe_aux_loss_coeff: float = 1e-3
    moe_router_score_function: str = "softmax"  # softmax | sigmoid
    moe_router_enable_expert_bias: bool = False  # aux-loss-free balancing
    moe_first_dense_layers: int = 0  # Ling-style: the first k layers stay dense
    moe_token_dispatcher_type: str = "alltoall"


@dataclass
class ParallelConfig:
    """Megatron parallel sizes; data parallel is whatever the world size leaves."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True


@dataclass
class DiffusionConfig:
    """Block-diffusion training: noise, WSD block-size schedule, masked-embedding noise."""

    mask_id: Optional[int] = None  # None: the tokenizer's [MASK]
    mask_ratio_min: float = 1e-3
    mask_ratio_max: float = 1.0
    per_block_timesteps: bool = False
    # WSD phases: [[block_size, amount], ...]; the last phase lasts until the end
    block_schedule: List[List[int]] = field(default_factory=lambda: [[32, 1]])
    block_schedule_unit: Literal["steps", "tokens"] = "steps"
    reference_block_size: Optional[int] = None  # extra validation at a fixed block size
    embedding_noise_std: float = 0.0
    embedding_noise_steps: int = 0
    embedding_noise_decay: Literal["linear", "cosine"] = "linear"


@dataclass
class DataConfig:
    """Packed training data (Megatron indexed datasets) or the embedded demo corpus."""

    demo: bool = False  # build / reuse the bundled stdlib corpus and tokenizer
    train_data: List[str] = field(default_factory=list)  # prefixes, or "weight prefix" pairs
    valid_data: List[str] = field(default_factory=list)
    tokenizer: Optional[str] = None  # SentencePiece .model or HF tokenizer.json
    seq_length: int = 256
    seed: int = 1234
    cache_dir: Optional[str] = None
    sft_data: Optional[str] = None  # JSONL for sft / dpo / rl stages


@dataclass
class PostTrainDataConfig:
    """JSONL data of a post-training stage (``sft``, ``dpo``) and how it becomes packed sequences."""

    data: List[str] = field(default_factory=list)  # JSONL files; empty: data.sft_data, or the bundled demo set
    valid_data: List[str] = field(default_factory=list)  # empty: hold out every n-th packed sequence
    valid_fraction: float = 0.05  # share of packed sequences held out when valid_data is empty
    chat_template: ChatTemplate = "auto"
    overlong: OverlongPolicy = "drop"  # samples longer than data.seq_length
    pad_loss: bool = True  # the EOD padding up to a whole block carries loss
    block_size: Optional[int] = None  # None: the init checkpoint's trained block size, else the schedule's last


@dataclass
class SFTConfig(PostTrainDataConfig):
    """``llada-cpt sft``: batch sizes count packed sequences (each becomes 2 rows with complementary)."""

    complementary: bool = True  # each sequence also trains with the inverse mask over its response tokens
    cap_lambda: Optional[float] = None  # CAP: None = plain SFT; 0 logs the confidence term without training it


@dataclass
class DPOConfig(PostTrainDataConfig):
    """``llada-cpt dpo``: DPO on the block-diffusion ELBO; the loss is a mean over preference pairs."""

    beta: float = 0.1
    reference: Literal["model", "precomputed"] = "model"  # frozen copy on the same ranks | one pass, cached
    lr: Optional[float] = None  # None: the final LR of an SFT init checkpoint, else train.lr


@dataclass
class RLConfig:
    """``llada-cpt rl``: trajectory-aware PPO / GRPO (TraceRL objective, DAPO dynamic sampling)."""

    data: List[str] = field(default_factory=list)  # {question, ground_truth_answer} JSONL; empty: bundled arithmetic
    prompt_template: str = "Question: {question}\nPut the final answer in \\boxed{{}}.\nAnswer: "
    chat_template: ChatTemplate = "raw"  # raw: the prompt text verbatim
    group_size: int = 4  # G rollouts per prompt
    groups_per_step: int = 4  # informative groups per optimizer step (global, split over DP ranks)
    max_oversample: float = 3.0  # draw at most groups_per_step * max_oversample groups per step
    dynamic_sampling: DynamicSampling = "accuracy"  # accuracy (DAPO: drop accuracy 0 or 1) | reward_std (all-equal)
    # rollout; the block size must equal the training block size (diffusion.block_schedule)
    block_size: int = 4
    threshold: float = 0.9
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    max_steps_per_block: Optional[int] = None
    # objective
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.0  # > 0: k3 KL to a frozen copy of the starting checkpoint
    entropy_coef: float = 0.0
    max_forwards: Optional[int] = None  # bound on trajectory forwards per rollout (merges steps beyond it)
    old_logprobs: Literal["recompute", "rollout"] = "recompute"  # forward pass before the update | sampler's own
    # rewards
    correctness_weight: float = 1.0
    format_weight: float = 0.0
    speed_reward: bool = False


@dataclass
class TrainConfig:
    """Optimisation; learning-rate schedule uses Megatron's OptimizerParamScheduler."""

    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_steps: int = 10
    lr_decay_style: Literal["constant", "linear", "cosine", "WSD"] = "cosine"
    lr_wsd_decay_steps: Optional[int] = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    init_from: Optional[str] = None  # Megatron checkpoint (AR or previous stage) to start from
    nan_policy: Literal["skip", "stop"] = "skip"
    # torch AdamW's one-kernel fused step (used when Megatron falls back to torch AdamW, i.e. without TE/apex):
    # None = on CUDA; false turns it off (e.g. to rule it out when chasing a numerical difference)
    fused_adamw: Optional[bool] = None


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    save_interval: int = 0  # 0 = only at the end
    resume: bool = True  # continue from save_dir/latest when present
    keep_last: int = 0  # 0 = keep all
    keep_best: int = 0  # never delete the best-N by validation perplexity


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int = 0  # 0 = only at checkpoints
    eval_iters: int = 4
    tensorboard_dir: Optional[str] = None  # default: <save_dir>/tensorboard
    peak_tflops: Optional[float] = None  # per device, for MFU; default: known GPUs, none on CPU


@dataclass
class Config:
    """Root of the tree: ``llada-cpt <stage> -c file.yaml section.key=value ...``."""

    stage: Stage = "cpt"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)

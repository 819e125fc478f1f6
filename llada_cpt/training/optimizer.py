"""Megatron-Core optimizer and learning-rate scheduler built from our config."""
from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..config.schema import Config
from ..megatron_patches.torch_optimizer import use_fused_adamw


def build_optimizer(cfg: Config, model_chunks: List[torch.nn.Module], bf16: bool, fused: Optional[bool] = None):
    """Adam with clipping inside Megatron's ``step``.

    With TE/apex Megatron uses their FusedAdam.  Without them it falls back to torch
    AdamW, which we switch to ``fused=True`` (one kernel for all parameters) when
    ``fused`` (default: ``train.fused_adamw``) is True, or when both are None on CUDA;
    gradient norm and clipping use ``torch._foreach_*`` there
    (``megatron_patches/torch_optimizer.py``).
    """
    t = cfg.train
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, model_chunks)
    fused = t.fused_adamw if fused is None else fused
    # set both ways, so that a checkpoint saved with the other choice loads with this one
    use_fused_adamw(optimizer, enabled=torch.cuda.is_available() if fused is None else fused)
    return optimizer


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Warmup then constant / linear / cosine / WSD decay, stepped once per optimizer step."""
    t = cfg.train
    warmup = min(t.lr_warmup_steps, max(t.train_steps - 1, 0))
    wsd_steps = (t.lr_wsd_decay_steps or max(1, t.train_steps // 10)) if t.lr_decay_style == "WSD" else None
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(t.train_steps, warmup + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.train_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style="cosine" if wsd_steps else None,
    )

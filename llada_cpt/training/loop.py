"""The training loop shared by every stage: stages vary the data and the step, not the loop.

Per step: block size from the WSD schedule (a function of consumed tokens) ->
the stage's micro-batches for this data-parallel rank -> Megatron forward /
backward over micro-batches (and pipeline stages) -> NaN guard -> optimizer and
LR-scheduler step -> logging, evaluation, checkpointing, signal handling.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..checkpoint import megatron as ckpt
from ..checkpoint.info import CheckpointInfo
from ..checkpoint.paths import latest_checkpoint
from ..checkpoint.verify import require_complete
from ..config.schema import Config
from ..config.validation import validate
from ..diffusion.inputs import DiffusionBatch
from ..diffusion.wsd import WSDSchedule
from ..errors import UserError
from . import nan_guard
from .flops import device_peak_flops, step_flops
from .logger import TrainLogger
from .validation import elbo_loss

if TYPE_CHECKING:
    from .stage import Stage


@dataclass
class StepData:
    """What a stage hands the loop for one optimizer step on this rank."""

    micro_batches: list[DiffusionBatch]
    data_indices: list[int] = field(default_factory=list)  # logged when a step goes bad
    skip_reason: Optional[str] = None  # the stage could not build a batch (RL dynamic sampling): no update


@dataclass
class Run:
    cfg: Config
    model_chunks: list
    optimizer: Any
    scheduler: Any
    wsd: WSDSchedule
    vocab_size: int
    mask_id: int
    dp_rank: int
    dp_size: int
    embedding_noise: Any = None
    iteration: int = 0
    consumed_tokens: int = 0
    consumed_samples: int = 0

    @property
    def micro_batches_per_step(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.dp_size)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.data.seq_length


def _is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def build_run(cfg: Config, stage: Stage) -> Run:
    """Distributed init, model, optimizer, scheduler, WSD; resume or initialise weights."""
    from ..model.provider import build_model, resolve_dtype
    from .distributed import initialize, wrap_ddp
    from .optimizer import build_optimizer, build_scheduler

    world = int(os.environ.get("WORLD_SIZE", "1"))
    stage.resolve_config(cfg)  # values from train.init_from enter the config before it is validated (and saved)
    validate(cfg, world_size=world)
    resume = latest_checkpoint(cfg.checkpoint.save_dir) if cfg.checkpoint.resume else None
    if resume is not None:  # a damaged checkpoint fails here, in a second, not after building the model
        require_complete(resume, resume=True)
    initialize(cfg.parallel, seed=cfg.train.seed)
    vocab_size, mask_id = stage.prepare(cfg)
    # converted HF models may carry more embedding rows than the tokenizer has tokens (Qwen)
    vocab_size = max(vocab_size, cfg.model.vocab_size or 0)
    if cfg.diffusion.mask_id is not None:
        mask_id = cfg.diffusion.mask_id
    if not 0 <= mask_id < vocab_size:
        raise UserError(f"mask id {mask_id} is outside the vocabulary (size {vocab_size}); "
                        "use a tokenizer with a [MASK] token or set diffusion.mask_id")
    bf16 = resolve_dtype(cfg.train.precision) == torch.bfloat16
    chunks = build_model(cfg.model, cfg.parallel, cfg.train.precision, vocab_size)
    chunks = wrap_ddp(chunks, cfg.parallel)
    optimizer = build_optimizer(cfg, chunks, bf16)
    scheduler = build_scheduler(cfg, optimizer)
    dp_rank = ps.get_data_parallel_rank()
    dp_size = ps.get_data_parallel_world_size()
    wsd = WSDSchedule.from_config(cfg.diffusion.block_schedule, cfg.data.seq_length,
                                  cfg.diffusion.block_schedule_unit, cfg.train.global_batch_size * cfg.data.seq_length)
    run = Run(cfg, chunks, optimizer, scheduler, wsd, vocab_size, mask_id, dp_rank, dp_size)
    if cfg.diffusion.embedding_noise_steps > 0 and cfg.diffusion.embedding_noise_std > 0:
        from ..model.embedding_noise import EmbeddingNoise
        from ..model.wrappers import unwrap

        run.embedding_noise = EmbeddingNoise(cfg.diffusion, mask_id, cfg.train.seed, dp_rank)
        for chunk in chunks:
            run.embedding_noise.attach(unwrap(chunk))
    if resume is not None:
        CheckpointInfo.read(resume).check_vocab(vocab_size)
        state = ckpt.load_checkpoint(resume, chunks, optimizer, scheduler)
        run.iteration = int(state["iteration"])
        run.consumed_tokens = int(state["consumed_tokens"])
        run.consumed_samples = int(state["consumed_samples"])
        stage.load_state_dict(state.get("stage", {}))
        for diff in wsd.check_state(state.get("wsd", {})):
            _print(f"note: WSD schedule changed since the checkpoint ({diff}); block size follows consumed tokens")
        _print(f"resumed from {resume} at step {run.iteration} ({run.consumed_tokens} tokens)")
    elif cfg.train.init_from:
        init = CheckpointInfo.read(cfg.train.init_from)
        init.check_vocab(vocab_size)
        path = init.path
        ckpt.load_checkpoint(path, chunks, optimizer=None, scheduler=None, restore_rng=False)
        _print(f"initialised weights from {path}")
    return run


def _print(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def _loop_state(run: Run, stage: Stage) -> dict:
    return {"iteration": run.iteration, "consumed_tokens": run.consumed_tokens,
            "consumed_samples": run.consumed_samples, "wsd": run.wsd.state_dict(), "stage": stage.state_dict()}


def run_step(run: Run, stage: Stage, batches: list[DiffusionBatch], forward_only: bool):
    """One forward(/backward) pass: the stage's ``before_step``, its step loss, its ``after_step``."""
    from .step import forward_backward

    stage.before_step(run, batches, forward_only)
    res = forward_backward(run.model_chunks, batches, forward_only=forward_only,
                           loss_fn=stage.step_loss(run, batches))
    return stage.after_step(run, res)


def evaluate(run: Run, stage: Stage, block_size: int) -> dict[str, float]:
    """Validation loss / perplexity at ``block_size`` over the stage's fixed evaluation batches."""
    for m in run.model_chunks:
        m.eval()
    if run.embedding_noise is not None:  # validation measures the clean model
        run.embedding_noise.set_step(run.cfg.diffusion.embedding_noise_steps)
    out = elbo_loss(stage.eval_data(run, block_size), lambda batches: run_step(run, stage, batches, True))
    for m in run.model_chunks:
        m.train()
    if run.embedding_noise is not None:
        run.embedding_noise.set_step(run.iteration)
    return {"loss": out["loss"], "ppl": out["ppl"]}


def elbo_validation(run: Run, stage: Stage, block_size: int) -> dict[str, float]:
    """Eval at the current block size and at the fixed reference block size (comparable across phases):
    the default :meth:`Stage.validate <llada_cpt.training.stage.Stage.validate>`."""
    out = {}
    cur = evaluate(run, stage, block_size)
    out.update(val_loss=cur["loss"], val_ppl=cur["ppl"], val_block_size=block_size)
    ref = run.cfg.diffusion.reference_block_size
    if ref:
        r = evaluate(run, stage, ref) if ref != block_size else cur
        out.update(val_loss_ref=r["loss"], val_ppl_ref=r["ppl"], val_ref_block_size=ref)
    return out


def _update(run: Run, stage: Stage, data: StepData, block: int, logger: TrainLogger, history: list) -> None:
    """Forward/backward, NaN guard, optimizer and scheduler step, counters and logging of one step."""
    cfg, t = run.cfg, run.cfg.train
    save_dir = cfg.checkpoint.save_dir
    run.optimizer.zero_grad()
    res = run_step(run, stage, data.micro_batches, forward_only=False)
    vals = {"loss": res.loss, **res.aux_losses, **res.metrics}
    # decided before optimizer.step(): in fp32/bf16 Megatron would apply a NaN update (see nan_guard)
    loss_ok = math.isfinite(vals["loss"])
    bad = not (loss_ok and nan_guard.grads_finite(run.model_chunks))
    grad_norm = float("nan")
    if not bad:
        ok, grad_norm, _ = run.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        bad = not ok  # fp16 loss-scaler overflow: Megatron skipped the update itself
    if bad:
        indices = nan_guard.describe_indices(nan_guard.global_data_indices(data.data_indices))
        what = f"loss {vals['loss']}" if not loss_ok else "gradients"
        msg = f"step {run.iteration + 1}: non-finite {what}; global batch data indices {indices}"
        if t.nan_policy == "stop":
            last_good = latest_checkpoint(save_dir)
            raise nan_guard.TrainingDiverged(
                f"{msg}; stopping (train.nan_policy=stop), `latest` still names "
                f"{last_good.name if last_good else 'no checkpoint'}; inspect those samples, lower train.lr "
                "or resume with train.nan_policy=skip")
        _print(msg + " -- step skipped (train.nan_policy=skip): no update, batch consumed")
    run.scheduler.step(increment=1)
    run.iteration += 1
    run.consumed_tokens += run.tokens_per_step
    run.consumed_samples += t.global_batch_size
    mask_ratio = sum(b.mask_ratio for b in data.micro_batches) / max(len(data.micro_batches), 1)
    tokens = sum(b.input_ids.numel() for b in data.micro_batches) * run.dp_size
    from .step import head_on_noised_half

    flops = step_flops(cfg.model, run.vocab_size, [b.layout for b in data.micro_batches],
                       head_on_noised_half(cfg.parallel)) * run.dp_size
    logger.record({**vals, "grad_norm": grad_norm, "mask_ratio": mask_ratio, "skipped": float(bad)}, tokens, flops)
    history.append({"step": run.iteration, "loss": vals["loss"], "block_size": block})
    if run.iteration % cfg.logging.log_interval == 0 or run.iteration == t.train_steps:
        lr = run.optimizer.param_groups[0]["lr"]
        logger.flush(run.iteration, run.consumed_tokens, block, lr)


def train(cfg: Config, stage: Stage) -> dict[str, Any]:
    """Run a stage to ``train.train_steps``; returns the last logged values (for tests and scripts)."""
    from ..runtime.signals import StopRequest
    from .distributed import all_reduce_host

    stop = StopRequest.install(all_reduce_host)  # before the (possibly long) build: an early signal still stops cleanly
    run = build_run(cfg, stage)
    t = cfg.train
    save_dir = cfg.checkpoint.save_dir
    tb_dir = cfg.logging.tensorboard_dir or (str(Path(save_dir) / "tensorboard") if save_dir else None)
    logger = TrainLogger(t.train_steps, tb_dir, _is_logging_rank(),
                         (cfg.logging.peak_tflops * 1e12) if cfg.logging.peak_tflops else device_peak_flops(),
                         dist.get_world_size() if dist.is_initialized() else 1, start_step=run.iteration,
                         jsonl_path=str(Path(save_dir) / "train_log.jsonl") if save_dir else None)
    if dist.get_rank() == 0 if dist.is_initialized() else True:
        print(f"llada-cpt {stage.name}: {dist.get_world_size() if dist.is_initialized() else 1} processes, "
              f"dp={run.dp_size}, {run.micro_batches_per_step} micro-batches/step, "
              f"{t.train_steps - run.iteration} steps to go", flush=True)
    history: list[dict] = []
    last: dict[str, Any] = {}
    prev_block = None
    if cfg.logging.eval_interval and run.iteration == 0:  # the starting point of the validation curve
        initial = stage.validate(run, run.wsd.block_size(0))
        for k, v in initial.items():
            logger.scalar(f"valid/{k}", v, 0)
        _print("step 0: validation " + " | ".join(f"{k} {v:.4g}" for k, v in initial.items()))
        last.update({f"initial_{k}": v for k, v in initial.items()})
    while run.iteration < t.train_steps:
        block = run.wsd.block_size(run.consumed_tokens)
        if block != prev_block:
            layout = "MDLM (x_t only, L)" if block >= cfg.data.seq_length else "BDLM [x_t ; x_0] (2L)"
            _print(f"step {run.iteration}: block size {block} -> layout {layout}")
            prev_block = block
        if run.embedding_noise is not None:
            run.embedding_noise.set_step(run.iteration)
        data = stage.step_data(run, block)
        if data.skip_reason is not None:  # agreed on every rank by the stage: no update, the step is consumed
            _print(f"step {run.iteration}: skipped, no update ({data.skip_reason})")
            run.iteration += 1
            logger.scalar("train/skipped_batches", 1.0, run.iteration)
        else:
            _update(run, stage, data, block, logger, history)
        stop_now = stop.requested  # collective: every rank evaluates it once per step
        metrics = None
        eval_due = cfg.logging.eval_interval and run.iteration % cfg.logging.eval_interval == 0
        save_due = save_dir and ((cfg.checkpoint.save_interval and run.iteration % cfg.checkpoint.save_interval == 0)
                                 or run.iteration == t.train_steps or stop_now)
        if eval_due or save_due:
            metrics = stage.validate(run, block)
            for k, v in metrics.items():
                logger.scalar(f"valid/{k}", v, run.iteration)
            _print(f"step {run.iteration}: validation " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            last.update(metrics)
        if save_due:
            path = ckpt.save_checkpoint(save_dir, run.iteration, run.model_chunks, run.optimizer, run.scheduler,
                                        _loop_state(run, stage), cfg,
                                        {**(metrics or {}), "consumed_tokens": run.consumed_tokens})
            ckpt.apply_retention(save_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)
            _print(f"saved checkpoint {path}")
        if stop_now and run.iteration < t.train_steps:
            saved = f"checkpoint saved at step {run.iteration}" if save_dir else "no checkpoint.save_dir, nothing saved"
            _print(f"stop requested by {stop.signame}: {saved}, exiting")
            logger.close()
            last.update(stopped=True, history=history, iteration=run.iteration)
            return last
    logger.close()
    last.update(history=history, iteration=run.iteration, stopped=False)
    return last

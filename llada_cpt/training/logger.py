"""One console line per logging interval, the same scalars in TensorBoard, and an ETA.

With ``jsonl_path`` every step's values are also appended, unaveraged and at full
precision, as one JSON object per line (``{"step": N, "loss": ...}``): the record
that resume and fault tests compare.  A resumed run appends; steps repeated after
a crash appear twice and the later line is the one that counts.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import psutil
import torch


def _fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_percent(fraction: float) -> str:
    """``23.2%``; small values keep two significant digits (a tiny model on a GPU: ``0.0041%``, not ``0.0%``)."""
    return f"{fraction * 100:.1f}%" if fraction >= 0.01 else f"{fraction * 100:.2g}%"


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def memory_gb() -> float:
    """Peak accelerator memory, or the process RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class TrainLogger:
    """Accumulates per-step values and prints / writes their interval means on the logging rank."""

    def __init__(self, total_steps: int, tensorboard_dir: Optional[str], enabled: bool, peak_flops: Optional[float],
                 world_size: int, start_step: int = 0, jsonl_path: Optional[str] = None):
        self.total_steps = total_steps
        self.enabled = enabled
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(tensorboard_dir)
        self.step = start_step
        self.jsonl = None
        if enabled and jsonl_path:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(jsonl_path, "a", encoding="utf-8")
        self._reset(start_step)
        self.run_start = time.time()
        self.run_start_step = start_step

    def _reset(self, step: int) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.tokens = 0
        self.flops = 0.0
        self.t0 = time.time()

    def record(self, values: dict[str, float], tokens: int, flops: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.tokens += tokens
        self.flops += flops
        self.step += 1  # record() is called once per optimizer step
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": self.step, **{k: float(v) for k, v in values.items()}}) + "\n")
            self.jsonl.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def flush(self, step: int, consumed_tokens: int, block_size: int, lr: float) -> Optional[str]:
        """Print and write the interval means; returns the line (None on non-logging ranks)."""
        if self.n == 0:
            return None
        elapsed = max(time.time() - self.t0, 1e-9)
        means = {k: v / self.n for k, v in self.sums.items()}
        tok_s = self.tokens / elapsed
        achieved = self.flops / elapsed / self.world_size  # per device
        mfu = achieved / self.peak_flops if self.peak_flops else None
        mem = memory_gb()
        done = step - self.run_start_step
        eta = (time.time() - self.run_start) / max(done, 1) * (self.total_steps - step)
        stats = {**means, "lr": lr, "block_size": block_size, "tokens_per_s": tok_s,
                 "tflops_per_device": achieved / 1e12, "memory_gb": mem, "consumed_tokens": consumed_tokens}
        if mfu is not None:
            stats["mfu"] = mfu
        self._reset(step)
        if not self.enabled:
            return None
        loss = means.get("loss", math.nan)
        parts = [
            f"step {step}/{self.total_steps}",
            f"tokens {_fmt_count(consumed_tokens)}",
            f"loss {loss:.4f}",
            f"lr {lr:.3e}",
            f"block {block_size}",
            f"mask {means.get('mask_ratio', math.nan):.3f}",
            f"grad {means.get('grad_norm', math.nan):.3f}",
            f"tok/s {_fmt_count(tok_s)}",
            f"MFU {_fmt_percent(mfu)}" if mfu is not None else f"MFU n/a ({achieved / 1e12:.3f} TFLOP/s/dev)",
            f"mem {mem:.2f}GB",
            f"eta {_fmt_time(eta)}",
        ]
        extra = [f"{k} {v:.4g}" for k, v in means.items() if k not in ("loss", "mask_ratio", "grad_norm")]
        line = " | ".join(parts + extra)
        print(line, flush=True)
        for k, v in stats.items():
            self.scalar(f"train/{k}", v, step)
        return line

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

"""The main job and generation through the CLI on one GPU (NCCL), as a user runs them.

Run with ``pytest -m gpu tests/test_gpu_end_to_end.py`` on a CUDA machine; skipped
without CUDA.  These caught what the CPU suite cannot: host-side counters
all-reduced on NCCL (it reduces device tensors only) and torch-created norm
weights left on the CPU when no DDP wrapper moves them (generation).
"""
from __future__ import annotations

import re

import pytest
import torch

from run_helpers import TINY_CONFIG, TINY_RUN, cli, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with `pytest -m gpu` there)"),
]


def test_demo_trains_and_generates_on_one_gpu(tmp_path):
    save = tmp_path / "run"
    train = run(cli("train", "-c", str(TINY_CONFIG), "--nproc", "1", *TINY_RUN, "train.train_steps=8",
                    "checkpoint.save_interval=8", "model.attention_backend=auto", f"checkpoint.save_dir={save}"),
                tmp_path, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    steps = re.findall(r"step (\d+)/8 \| .* \| MFU ([0-9.e-]+)% \|", train.stdout)
    assert [int(s) for s, _ in steps][-1] == 8, train.stdout
    assert all(float(m) > 0 for _, m in steps), "MFU is known on a GPU and must not print as 0"
    assert (save / "latest").exists()

    gen = run(cli("generate", "--ckpt", str(save), "--prompt", "def f(x):", "--block-size", "4",
                  "--max-new-tokens", "16", "--quiet"), tmp_path, timeout=300)
    assert gen.returncode == 0, gen.stdout[-3000:] + gen.stderr[-3000:]
    assert gen.stdout.strip()

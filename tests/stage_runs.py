"""Shared by the SFT / DPO stage tests: a small in-process config, and the CLI chain CPT -> SFT -> DPO.

The CLI runs are cached on disk under pytest's session base directory, so the
chain runs once per session whichever test module asks first (each module gets
its own fixture object, the directory is shared).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Sequence

from run_helpers import REPO, TINY_CONFIG, cli, run

SFT_CONFIG = REPO / "configs" / "tiny_sft.yaml"
DPO_CONFIG = REPO / "configs" / "tiny_dpo.yaml"
SFT_DATA = REPO / "llada_cpt" / "data" / "bundled" / "sft_demo.jsonl"
DPO_DATA = REPO / "llada_cpt" / "data" / "bundled" / "dpo_demo.jsonl"

# a model small enough for several layouts in one spawned test; 4 heads / 4 groups split over TP=2
SMALL = [
    "data.demo=true", "data.seq_length=128", "model.num_layers=2", "model.hidden_size=64",
    "model.ffn_hidden_size=128", "model.num_attention_heads=4", "train.micro_batch_size=2",
    "train.global_batch_size=4", "train.train_steps=10", "train.lr_warmup_steps=0",
    "parallel.use_distributed_optimizer=false", "diffusion.block_schedule=[[32,1]]",
    "diffusion.mask_ratio_min=0.1", "diffusion.mask_ratio_max=0.9", "logging.eval_iters=1",
]

SFT_STEPS, DPO_STEPS = 16, 12
SFT_MIN_LR = 1e-3  # the SFT run's final rate: DPO's default learning rate


def small_config(stage: str, *overrides: str):
    from llada_cpt.config import load_config

    cfg = load_config(None, [*SMALL, *overrides])
    cfg.stage = stage
    return cfg


def _cli_run(root: Path, name: str, argv: List[str]) -> Dict[str, object]:
    """Run once per session; the result (exit code, output) is kept next to the run directory."""
    save = root / name
    record = root / f"{name}.json"
    if not record.is_file():
        root.mkdir(parents=True, exist_ok=True)
        proc = run(argv + [f"checkpoint.save_dir={save}"], cwd=root, timeout=500)
        record.write_text(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout,
                                      "stderr": proc.stderr[-5000:]}))
    return {**json.loads(record.read_text()), "save_dir": save}


def cpt_run(root: Path) -> Dict[str, object]:
    """A tiny CPT checkpoint of the demo model (final block size 32)."""
    return _cli_run(root, "cpt", cli(
        "train", "-c", str(TINY_CONFIG), "--nproc", "2", "train.train_steps=8", "train.lr_warmup_steps=2",
        "diffusion.block_schedule=[[32,1]]", "diffusion.embedding_noise_steps=0", "logging.eval_interval=0",
        "logging.eval_iters=1", "logging.log_interval=4"))


def sft_run(root: Path) -> Dict[str, object]:
    """SFT with complementary masks and CAP, initialised from the CPT checkpoint."""
    cpt = cpt_run(root)
    assert cpt["returncode"] == 0, cpt["stderr"]
    return _cli_run(root, "sft", cli(
        "sft", "-c", str(SFT_CONFIG), "--nproc", "2", f"train.init_from={cpt['save_dir']}",
        f"train.train_steps={SFT_STEPS}", "train.lr=2e-3", f"train.min_lr={SFT_MIN_LR}", "train.lr_warmup_steps=2",
        f"logging.eval_interval={SFT_STEPS}", "logging.log_interval=1", "logging.eval_iters=1",
        f"sft.valid_data=[{SFT_DATA}]"))


def dpo_run(root: Path) -> Dict[str, object]:
    """DPO from the SFT checkpoint; validation on (a fixed-noise draw of) the training pairs.

    One Monte Carlo ELBO sample per pair is a noisy estimate: a narrower mask-ratio band and 16
    sequences per step let a dozen steps show the preference being learnt."""
    sft = sft_run(root)
    assert sft["returncode"] == 0, sft["stderr"]
    return _cli_run(root, "dpo", cli(
        "dpo", "-c", str(DPO_CONFIG), "--nproc", "2", f"train.init_from={sft['save_dir']}",
        f"train.train_steps={DPO_STEPS}", "train.micro_batch_size=4", "train.global_batch_size=16",
        "diffusion.mask_ratio_min=0.3", "diffusion.mask_ratio_max=0.7", f"logging.eval_interval={DPO_STEPS}",
        "logging.log_interval=1", "logging.eval_iters=4", f"dpo.valid_data=[{DPO_DATA}]"))


def validation_losses(stdout: str) -> Dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+): validation val_loss ([0-9.]+)", stdout)}


def step_records(save_dir: Path) -> List[dict]:
    lines = (Path(save_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)

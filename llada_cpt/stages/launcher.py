"""Command-line entry shared by the training stages (train/cpt, sft, dpo, rl).

``llada-cpt train -c cfg.yaml [section.key=value ...] [--dry-run] [--nproc N]``.
``--nproc N`` re-launches the same command under ``torchrun`` on this machine
(the demo's 2 CPU processes); under an existing torchrun / Slurm launch it is
ignored.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable, Optional, Sequence

from ..config import dump_config, load_config, validate
from ..config.schema import Config
from ..training.signals import EXIT_REQUEUE


def parse(argv: Sequence[str], stage: str) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(prog=f"llada-cpt {stage}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4 train.lr=1e-4")
    p.add_argument("--dry-run", action="store_true", help="print the resolved, validated config and exit")
    p.add_argument("--nproc", type=int, default=None, help="launch N local processes with torchrun")
    args = p.parse_args(list(argv))
    cfg = load_config(args.config, args.overrides)
    cfg.stage = stage
    return args, cfg


def _relaunch(nproc: int, argv: Sequence[str], command: str) -> int:
    """Run ``llada-cpt <command> ...`` again under torchrun with ``nproc`` local ranks."""
    rest = [a for a in argv]
    i = rest.index("--nproc")
    del rest[i:i + 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "llada_cpt.cli", command, *rest]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)


def stage_main(argv: Optional[Sequence[str]], command: str, stage_name: str, make_stage: Callable[[Config], object]) -> int:
    argv = list(argv or [])
    args, cfg = parse(argv, stage_name)
    world = int(os.environ.get("WORLD_SIZE", "0")) or None
    if args.dry_run:
        validate(cfg, world_size=world or args.nproc)
        print(dump_config(cfg), end="")
        return 0
    if args.nproc and world is None:
        validate(cfg, world_size=args.nproc)
        return _relaunch(args.nproc, argv, command)
    from ..training.loop import train

    result = train(cfg, make_stage(cfg))
    return EXIT_REQUEUE if result.get("stopped") else 0

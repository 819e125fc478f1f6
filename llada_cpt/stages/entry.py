"""Command-line entry shared by the training stages (train/cpt, sft, dpo, rl).

``llada-cpt train -c cfg.yaml [section.key=value ...] [--dry-run] [--nproc N]``.
``--nproc N`` starts N local ranks (``torchrun --standalone``) through
:func:`llada_cpt.runtime.launch.relaunch_local`; under an existing torchrun / Slurm launch it is ignored.
On a cluster, ``launch/torchrun.sh`` and ``launch/slurm.sbatch`` start the ranks
(``python -m llada_cpt.runtime.launch``).

Exit codes: 0 finished, 2 user error (one line naming the problem and the fix),
3 = checkpoint saved after a stop request (SIGTERM / SIGUSR1 / Ctrl-C; requeue me).
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Optional, Sequence

from ..arg_types import int_range
from ..config import dump_config, load_config, validate
from ..config.schema import Config
from ..runtime.launch import relaunch_local
from ..runtime.signals import EXIT_REQUEUE


def parse(argv: Sequence[str], stage: str, command: Optional[str] = None) -> tuple[argparse.Namespace, Config]:
    """``command`` is what the user typed (``train`` runs stage ``cpt``); overrides may come before or
    after the options."""
    p = argparse.ArgumentParser(prog=f"llada-cpt {command or stage}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML config file, or the name of a shipped recipe "
                                          "(tiny_cpu, qwen3_dense_cpt, ...; see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4 train.lr=1e-4")
    p.add_argument("--dry-run", action="store_true", help="print the resolved, validated config and exit")
    p.add_argument("--nproc", type=int_range(1), default=None,
                   help="launch N local processes (like torchrun --standalone)")
    args = p.parse_intermixed_args(list(argv))
    cfg = load_config(args.config, args.overrides)
    cfg.stage = stage
    return args, cfg


def stage_main(argv: Optional[Sequence[str]], command: str, stage_name: str,
               make_stage: Callable[[Config], object]) -> int:
    """Run ``llada-cpt <command> <argv>``: print the config (``--dry-run``), start ``--nproc`` ranks, or train."""
    argv = list(argv or [])
    args, cfg = parse(argv, stage_name, command)
    stage = make_stage(cfg) if hasattr(make_stage, "resolve_config") else None
    if stage is not None:  # values from train.init_from: validated, printed (--dry-run) and saved resolved
        stage.resolve_config(cfg)
    world = int(os.environ.get("WORLD_SIZE", "0")) or None
    if args.dry_run:
        validate(cfg, world_size=world or args.nproc)
        print(dump_config(cfg), end="")
        return 0
    if args.nproc is not None and world is None:
        validate(cfg, world_size=args.nproc)
        return relaunch_local(command, argv, args.nproc)  # the ranks run the command itself
    from ..training.distributed import destroy
    from ..training.loop import train

    result = train(cfg, stage or make_stage(cfg))
    destroy()  # exiting with live gloo threads can abort ("terminate called without an active exception")
    return EXIT_REQUEUE if result.get("stopped") else 0

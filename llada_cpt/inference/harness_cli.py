"""``llada-cpt lm-eval``: lm-evaluation-harness on a checkpoint (every flag of ``lm-eval run``).

``llada-cpt lm-eval --model_args ckpt=RUN_OR_CHECKPOINT[,block_size=32,mc_samples=32,...] --tasks TASKS
[--output_path out/ --log_samples ...] [--nproc N]``

It registers the harness model ``llada_cpt`` (:mod:`llada_cpt.inference.harness`),
defaults ``--model`` to it, adds the tasks shipped with the project
(:data:`llada_cpt.eval_tasks.TASKS_DIR`, next to any ``--include_path``) and hands
over to the harness's own ``run``.  ``--nproc N`` starts N local ranks (torchrun,
like ``generate``): ``tp`` of them (``--model_args tp=...``) hold one replica and
the harness splits the requests over the ``N / tp`` replicas; only rank 0 prints
and writes results.  Under an existing torchrun / Slurm launch ``--nproc`` is ignored.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from typing import List, Optional, Sequence

from ..errors import ConfigError

__all__ = ["main"]

_SUBCOMMANDS = ("run", "ls", "validate")


def _nproc(argv: Sequence[str]) -> Optional[int]:
    for i, a in enumerate(argv):
        if a.startswith("--nproc="):
            value = a.split("=", 1)[1]
        else:
            value = argv[i + 1] if a == "--nproc" and i + 1 < len(argv) else None
        if a == "--nproc" and value is None:
            raise ConfigError("--nproc needs a number of processes")
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"--nproc {value!r} is not a number of processes") from None
    return None


def _harness_argv(argv: List[str]) -> List[str]:
    """``lm-eval`` arguments: ``run`` unless another subcommand is named, ``--model llada_cpt`` by default."""
    argv = list(argv)
    if not argv or argv[0] not in _SUBCOMMANDS:
        argv.insert(0, "run")
    if argv[0] == "run" and not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        argv[1:1] = ["--model", "llada_cpt"]
    return argv


def _check_installed() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("lm-evaluation-harness is not installed; install the extra: pip install "
                          "'llada-cpt[eval]' (or pip install lm-eval)") from None


def _with_project_tasks(args: argparse.Namespace) -> None:
    from ..eval_tasks import TASKS_DIR

    extra = getattr(args, "include_path", None)
    args.include_path = [str(TASKS_DIR)] + ([extra] if extra else [])


def _check_model_args(args: argparse.Namespace) -> int:
    """Validate ``llada_cpt`` model_args before any process starts; returns the TP size."""
    from .engine import inspect_checkpoint
    from .harness import parse_model_args

    if args.model != "llada_cpt":
        return 1
    if not args.tasks:
        raise ConfigError("no --tasks given; name at least one task (e.g. --tasks llada_arith_mc)")
    opts = parse_model_args(dict(args.model_args or {}))
    info = inspect_checkpoint(opts.ckpt)
    if opts.block_size is not None and opts.block_size > info.context_length:
        raise ConfigError(f"model_args block_size={opts.block_size} exceeds the model's context "
                          f"{info.context_length}")
    return opts.tp


def _quiet_rank(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """Ranks other than 0 print nothing and write nothing the user sees.

    The harness returns results on every data-parallel rank 0, i.e. on each TP rank
    of the first replica; their copies go to a private directory removed afterwards.
    """
    for name in ("wandb_args", "trackio_args", "hf_hub_log_args"):
        if getattr(args, name, None):
            setattr(args, name, None)
    if getattr(args, "output_path", None):
        args.output_path = stack.enter_context(tempfile.TemporaryDirectory(prefix="llada-lm-eval-"))
    devnull = stack.enter_context(open(os.devnull, "w"))
    stack.enter_context(contextlib.redirect_stdout(devnull))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    _check_installed()
    from ..runtime.launch import without_nproc
    from .cli import is_rank0, relaunch

    nproc = _nproc(argv)
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    cli = HarnessCLI()
    args = cli._parser.parse_args(_harness_argv(without_nproc(argv)))
    if getattr(args, "command", None) is None:
        cli._parser.print_help()
        return 0
    if args.command != "run":
        _with_project_tasks(args)
        cli.execute(args)
        return 0
    tp = _check_model_args(args)
    code = relaunch("lm-eval", argv, argparse.Namespace(tp=tp, nproc=nproc))
    if code is not None:
        return code
    from . import harness  # noqa: F401  (registers the `llada_cpt` model)

    setup_logging()
    _with_project_tasks(args)
    with contextlib.ExitStack() as stack:
        if not is_rank0():
            _quiet_rank(args, stack)
        cli.execute(args)
    from ..training.distributed import destroy

    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

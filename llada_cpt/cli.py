"""The single ``llada-cpt`` console script.

Each subcommand lives in its own module exposing ``main(argv) -> int``; modules
are imported lazily so that ``llada-cpt preprocess`` does not pay for importing
Megatron.  User errors (:class:`llada_cpt.errors.UserError`) print one line
naming the problem and the fix and exit with status 2.
"""
from __future__ import annotations

import importlib
import signal
import sys
from typing import Optional, Sequence

from .errors import UserError, find_disk_full

COMMANDS = {
    "train": ("llada_cpt.stages.cpt", "block-diffusion continual pre-training (CPT)"),
    "sft": ("llada_cpt.stages.sft", "supervised fine-tuning (mask band, complementary masks, CAP)"),
    "dpo": ("llada_cpt.stages.dpo", "DPO on the diffusion ELBO"),
    "rl": ("llada_cpt.stages.rl", "trajectory-aware RL (TraceRL / GRPO)"),
    "preprocess": ("llada_cpt.data.preprocess", "JSONL / text -> Megatron indexed dataset"),
    "merge": ("llada_cpt.checkpoint.merge", "top-k checkpoint averaging"),
    "convert": ("llada_cpt.convert.cli", "Hugging Face <-> Megatron checkpoint conversion"),
    "generate": ("llada_cpt.inference.cli", "block-diffusion sampling"),
    "eval": ("llada_cpt.inference.evaluate", "validation perplexity and answer accuracy"),
    "checkpoint": ("llada_cpt.checkpoint.verify", "`checkpoint verify PATH`: is a checkpoint (or a run's) complete?"),
    "lm-eval": ("llada_cpt.inference.harness_cli", "lm-evaluation-harness tasks on a checkpoint ([eval] extra)"),
}


def _usage() -> str:
    lines = ["usage: llada-cpt <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `llada-cpt <command> --help` for the options of one command."]
    return "\n".join(lines)


def _disk_full_line(reason: str) -> str:
    return f"disk full ({reason}); free space and run the command again"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        print(f"llada-cpt: unknown command `{name}`.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:  # offline tools leave nothing partial behind (temporary outputs are removed)
        print(f"llada-cpt {name}: interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception as err:  # noqa: BLE001 - user errors, a full disk, a lost peer: one line; the rest re-raises
        from .runtime.launch import lost_peer_line, report_error

        full = find_disk_full(err)
        lost = None if isinstance(err, UserError) or full else lost_peer_line(err)
        if not isinstance(err, UserError) and full is None and lost is None:
            raise
        message = err if isinstance(err, UserError) else _disk_full_line(full) if full else lost
        line = f"llada-cpt {name}: error: {message}"
        if not report_error(line):  # in a rank of `--nproc` / launch/*.sh the launcher prints it once
            print(line, file=sys.stderr, flush=True)
        return 1 if lost else 2


if __name__ == "__main__":
    sys.exit(main())

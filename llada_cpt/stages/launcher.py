"""Command-line entry shared by the training stages (train/cpt, sft, dpo, rl), and their launcher.

``llada-cpt train -c cfg.yaml [section.key=value ...] [--dry-run] [--nproc N]``.
``--nproc N`` starts N local ranks (``torchrun --standalone``) through
:func:`run_elastic`; under an existing torchrun / Slurm launch it is ignored.

``python -m llada_cpt.stages.launcher [torchrun options] -m llada_cpt.cli <stage> ...``
is torchrun with the semantics a cluster job needs (``launch/torchrun.sh`` and
``launch/slurm.sbatch`` use it).  Plain torchrun loses them:

* exit codes pass through: 0 finished, 2 user error (its one-line message
  printed once, no launcher traceback), 3 = checkpoint saved after a stop
  request (requeue me), otherwise the first failing rank's code;
* SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) to the launcher become a stop request through the stop file
  the ranks poll, instead of being re-sent to the ranks as signals: Slurm
  signals every process of a step, so forwarding would turn one preemption
  into the "second signal, exit at once" case.  A second signal to the
  launcher kills the ranks at once (the last complete checkpoint stays ``latest``).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..arg_types import int_range
from ..config import dump_config, load_config, validate
from ..config.schema import Config
from ..training.signals import EXIT_REQUEUE, SIGNALS, STOP_FILE_ENV

EXIT_USER_ERROR = 2
ERROR_FILE_ENV = "LLADA_CPT_ERROR_FILE"  # set by run_elastic: where a rank leaves its one-line user error


def report_error(line: str) -> bool:
    """In a rank started by :func:`run_elastic`: hand the error line to the launcher, which prints it once.

    Returns False (the caller prints it) outside such a launch.  The first rank to fail wins.
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if not path or "LOCAL_RANK" not in os.environ:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return True
    except OSError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")
    return True


# what gloo / the c10d store say when the other end of a connection has gone away
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def lost_peer_line(err: BaseException) -> Optional[str]:
    """The one-line message for a rank whose collective failed because another process of the job died
    (a node lost, a rank killed), or None for any other error."""
    text = str(err)
    if not isinstance(err, RuntimeError) or "WORLD_SIZE" not in os.environ:
        return None
    reason = next((t for t in _PEER_GONE if t in text), None)
    if reason is None:
        return None
    return (f"lost contact with another process of the job ({reason}): a node or a rank died, was killed or "
            "failed (its own output, if any, says why); the last complete checkpoint stays `latest`, start every "
            "node again to resume from it")


def parse(argv: Sequence[str], stage: str, command: Optional[str] = None) -> tuple[argparse.Namespace, Config]:
    """``command`` is what the user typed (``train`` runs stage ``cpt``); overrides may come before or
    after the options."""
    p = argparse.ArgumentParser(prog=f"llada-cpt {command or stage}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML config file, or the name of a shipped recipe (tiny_cpu, qwen3_dense_cpt, ...; see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4 train.lr=1e-4")
    p.add_argument("--dry-run", action="store_true", help="print the resolved, validated config and exit")
    p.add_argument("--nproc", type=int_range(1), default=None, help="launch N local processes (like torchrun --standalone)")
    args = p.parse_intermixed_args(list(argv))
    cfg = load_config(args.config, args.overrides)
    cfg.stage = stage
    return args, cfg


class _SignalRelay:
    """Launcher-side SIGTERM / SIGUSR1 / SIGINT: first one -> stop file, second -> kill the ranks."""

    def __init__(self, stop_file: str, prog: str):
        self.stop_file = stop_file
        self.prog = prog
        self.signum: Optional[int] = None
        self.second = False
        self.previous = {}

    def install(self) -> "_SignalRelay":
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __call__(self, signum: int, _frame) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            Path(self.stop_file).touch()
            print(f"{self.prog}: got {name}: the ranks save a checkpoint at the next step boundary and exit "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        self.signum, self.second = signum, True
        # the agent catches this, kills the ranks with sigval and re-raises it to us
        raise SignalException(f"second stop signal {name}", sigval=signal.SIGKILL)


def _quiet_elastic_loggers() -> None:
    """The agent's own warnings repeat what the ranks already said (each logger sets its own level)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.launcher") \
                or name == "torch.distributed.run":
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _prog_of(torchrun_argv: Sequence[str]) -> str:
    argv = list(torchrun_argv)
    if "llada_cpt.cli" in argv:
        i = argv.index("llada_cpt.cli")
        if i + 1 < len(argv):
            return f"llada-cpt {argv[i + 1]}"
    return "llada-cpt"


def run_elastic(torchrun_argv: Sequence[str], prog: Optional[str] = None) -> int:
    """Run torchrun (same options) in this process; returns the exit code described in the module doc."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    prog = prog or _prog_of(torchrun_argv)
    args = torchrun.parse_args(list(torchrun_argv))
    _quiet_elastic_loggers()
    work = tempfile.mkdtemp(prefix="llada-cpt-launch-")
    error_file = os.path.join(work, "error")
    saved_env = {k: os.environ.get(k) for k in (STOP_FILE_ENV, ERROR_FILE_ENV, "TORCHELASTIC_SIGNALS_TO_HANDLE",
                                                "OMP_NUM_THREADS")}
    os.environ.setdefault(STOP_FILE_ENV, os.path.join(work, "STOP"))  # Slurm sets its own (in the run dir)
    os.environ[ERROR_FILE_ENV] = error_file
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the agent must leave SIGTERM and SIGINT to us (torch >= 2.6; older versions forward them once to the
    # ranks: also graceful); newer versions take it as an option that overrides the environment variable
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    if hasattr(args, "signals_to_handle"):
        args.signals_to_handle = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"]
    relay = _SignalRelay(os.environ[STOP_FILE_ENV], prog).install()
    try:
        torchrun.run(args)
        return 0
    except RendezvousError as err:  # the agents lost each other (a node died while they were talking)
        print(f"{prog}: error: lost the other nodes of the job ({type(err).__name__}: {err}); start every node "
              "again to resume from `latest`", file=sys.stderr, flush=True)
        return 1
    except SignalException as err:
        if relay.second:
            sig = relay.signum
            print(f"{prog}: stopped at once by a second {signal.Signals(sig).name}; the last complete checkpoint "
                  "stays `latest`", file=sys.stderr, flush=True)
        else:  # SIGHUP / SIGQUIT, which the agent handles (and forwards to the ranks) itself
            sig = err.sigval
            print(f"{prog}: interrupted by {signal.Signals(sig).name}", file=sys.stderr, flush=True)
        return 128 + int(sig)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        if code == EXIT_REQUEUE:
            return EXIT_REQUEUE
        if os.path.isfile(error_file):  # a UserError (exit 2) or a lost peer (exit 1) in a rank: its one line
            print(Path(error_file).read_text().rstrip("\n"), file=sys.stderr, flush=True)
            return code if code > 0 else EXIT_USER_ERROR
        how = f"signal {failure.signal_name()}" if code < 0 else f"exit code {code}"
        print(f"{prog}: error: rank {rank} failed with {how}; its output above says why", file=sys.stderr,
              flush=True)
        return 128 - code if code < 0 else (code or 1)
    finally:
        relay.restore()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (what each launched rank runs)."""
    rest, skip = [], False
    for a in argv:
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        skip = a == "--nproc"
        if not skip:
            rest.append(a)
    return rest


def stage_main(argv: Optional[Sequence[str]], command: str, stage_name: str, make_stage: Callable[[Config], object]) -> int:
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
        rest = without_nproc(argv)  # the ranks run the command itself
        return run_elastic(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "llada_cpt.cli", command, *rest],
                           prog=f"llada-cpt {command}")
    from ..training.distributed import destroy
    from ..training.loop import train

    result = train(cfg, stage or make_stage(cfg))
    destroy()  # exiting with live gloo threads can abort ("terminate called without an active exception")
    return EXIT_REQUEUE if result.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(run_elastic(sys.argv[1:]))

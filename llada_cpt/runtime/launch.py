"""Starting ranks: torchrun with the exit codes and stop semantics a job needs, and the error line a rank hands back.

``python -m llada_cpt.runtime.launch [torchrun options] -m llada_cpt.cli <command> ...``
is torchrun with the semantics a cluster job needs (``launch/torchrun.sh`` and
``launch/slurm.sbatch`` use it; ``--nproc N`` of a command goes through
:func:`relaunch_local`).  Plain torchrun loses them:

* exit codes pass through: 0 finished, 2 user error (its one-line message
  printed once, no launcher traceback), 3 = checkpoint saved after a stop
  request (requeue me), otherwise the first failing rank's code;
* SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) to the launcher become a stop request through the stop file
  the ranks poll (:mod:`llada_cpt.runtime.signals`), instead of being re-sent to the ranks as signals: Slurm
  signals every process of a step, so forwarding would turn one preemption
  into the "second signal, exit at once" case.  A second signal to the
  launcher kills the ranks at once (the last complete checkpoint stays ``latest``).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .signals import EXIT_REQUEUE, SIGNALS, STOP_FILE_ENV

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


def relaunch_local(command: str, argv: Sequence[str], nproc: int, prog: Optional[str] = None) -> int:
    """Run ``llada-cpt <command> <argv>`` (less ``--nproc``) as ``nproc`` local ranks, like ``torchrun --standalone``.

    The one way a command's ``--nproc N`` starts its ranks; returns :func:`run_elastic`'s exit code.
    ``prog`` names the command in the launcher's own lines (default ``llada-cpt <command>``).
    """
    return run_elastic(["--standalone", f"--nproc-per-node={nproc}", "-m", "llada_cpt.cli", command,
                        *without_nproc(argv)], prog=prog or f"llada-cpt {command}")


if __name__ == "__main__":
    sys.exit(run_elastic(sys.argv[1:]))

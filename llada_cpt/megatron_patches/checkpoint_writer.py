"""Keep the checkpoint writer's helper process alive through stop signals (all devices, 0.16-0.19).

``dist_checkpointing`` (torch_dist strategy, ``FileSystemWriterAsync``) collects
write results through a queue served by a ``multiprocessing`` Manager process,
spawned at the first save and kept for the life of the rank, in the rank's
process group.  A scheduler that stops a job signals every process of it
(Slurm's SIGTERM on preemption or time limit, ``--signal=USR1`` without ``B:``,
torchrun's shutdown of a rank's process group); the Manager, a fresh
interpreter with default handlers, dies, and the very save the stop asks for
fails with ``BrokenPipeError``.  The patch creates that queue up front with a
Manager that ignores SIGTERM, SIGUSR1 and SIGINT (SIGKILL still ends it; it is
shut down with the rank as before).  Without the private ``_results_queue``
(other versions) it does nothing.
"""
from __future__ import annotations

import signal
from typing import List

__all__ = ["apply"]

_MANAGER = None


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def apply() -> List[str]:
    global _MANAGER
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return []
    if getattr(fa, "_results_queue", "absent") is not None:  # already created (by us or a save), or not this API
        return ["checkpoint_writer"] if _MANAGER is not None else []
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))  # the context Megatron uses
    manager.start(initializer=_ignore_stop_signals)
    _MANAGER = manager
    fa._results_queue = manager.Queue()
    return ["checkpoint_writer"]

"""Graceful stop on SIGTERM / SIGUSR1 (preemption, Slurm ``--signal``, ``scancel``) and Ctrl-C (SIGINT).

The first signal asks the loop to save a checkpoint at the next step boundary
and exit with :data:`EXIT_REQUEUE`, which ``launch/slurm.sbatch`` turns into a
requeue; a second signal exits at once.  Ranks agree on the stop through an
all-reduce so that every rank saves the same step even when only one of them
received the signal.  Launchers that cannot deliver signals to the ranks
(Slurm batch scripts with srun + torchrun in between, and
:mod:`llada_cpt.runtime.launch`, which must not forward a signal the ranks may
already have had) instead touch the file named by ``LLADA_CPT_STOP_FILE``,
which is polled at the same point.

The all-reduce is handed in (``training.distributed.all_reduce_host``) so that
``runtime`` does not import ``training``, which imports it.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist

# (values, op) -> the reduced values on the CPU, wherever the backend reduces: training.distributed.all_reduce_host
AllReduce = Callable[[torch.Tensor, dist.ReduceOp], torch.Tensor]

EXIT_REQUEUE = 3  # "checkpoint saved, please run me again"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # Ctrl-C: save and exit, like a preemption
STOP_FILE_ENV = "LLADA_CPT_STOP_FILE"


class StopRequest:
    def __init__(self, all_reduce: AllReduce) -> None:
        self._all_reduce = all_reduce
        self._local = False
        self._agreed = False
        self.signame: Optional[str] = None

    @classmethod
    def install(cls, all_reduce: AllReduce) -> "StopRequest":
        req = cls(all_reduce)
        for sig in SIGNALS:
            signal.signal(sig, req._handler)
        if "megatron.core" in sys.modules:  # a process that can save Megatron checkpoints (the training loop)
            # a scheduler signals every process of the job, the checkpoint writer's helper too: keep it
            # alive so that the save the stop asks for can complete
            from llada_cpt.megatron_patches import checkpoint_writer

            checkpoint_writer.apply()
        return req

    def _handler(self, signum, _frame) -> None:
        if self._local:  # second signal: leave now, the last complete checkpoint stays `latest`
            os._exit(128 + signum)
        self._local = True
        self.signame = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """Collective: True on every rank once any rank has been signalled (call once per step)."""
        if self._agreed:
            return True
        stop_file = os.environ.get(STOP_FILE_ENV)
        if not self._local and stop_file and os.path.exists(stop_file):
            self._local, self.signame = True, "stop file"
        flag = self._all_reduce(torch.tensor([1 if self._local else 0], dtype=torch.int32), dist.ReduceOp.MAX)
        self._agreed = bool(flag.item())
        if self._agreed and self.signame is None:
            self.signame = "peer"
        return self._agreed

"""Spawn N real gloo ranks for a multi-process test.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes
(``spawn``: nothing of the pytest process leaks in, and the CPU patches applied
by ``llada_cpt.training.distributed.initialize`` stay out of it), sets the
torchrun environment variables, calls ``fn(rank, world_size, *args)`` in each and
returns the per-rank return values (anything ``torch.save`` can store).  ``fn``
must be a module-level function of an importable module.  A rank that raises
fails the test with its traceback; a hang is killed after ``timeout`` seconds.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")  # Megatron's "TE/apex not installed" chatter
    result = fn(rank, world_size, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; their results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), out_dir, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"distributed test did not finish within {timeout:.0f} s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# the optimizer layout that reshards across DP sizes (what checkpoint/megatron.py saves)
RESHARDABLE = {"distrib_optim_sharding_type": "fully_reshardable"}


def save_model_and_optimizer(model, optimizer, directory: str) -> None:
    """``dist_checkpointing.save`` of a model chunk and its Megatron optimizer (every rank calls it)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    state = {"model": model.sharded_state_dict()}
    state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=RESHARDABLE)
    if dist.get_rank() == 0:
        os.makedirs(directory)
    dist.barrier()
    dist_checkpointing.save(state, directory)


def load_model_and_optimizer(model, optimizer, directory: str) -> None:
    """Load what :func:`save_model_and_optimizer` wrote into fresh objects."""
    from megatron.core import dist_checkpointing

    state = {"model": model.sharded_state_dict()}
    state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True, metadata=RESHARDABLE)
    loaded = dist_checkpointing.load(state, directory)
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])


def max_diff(a: list, b: list) -> float:
    """Largest absolute elementwise difference between two lists of tensors (e.g. gradients per parameter)."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b))

"""Process-group and Megatron parallel-state set-up, the same on 2 CPU processes and on clusters.

``initialize`` reads the torchrun / Slurm-via-torchrun environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; a single
process without them), picks gloo on CPU and NCCL on GPU, applies the CPU
patches when there is no GPU, builds Megatron's TP/PP/CP/EP/DP groups and seeds
the model-parallel RNG tracker.

Context parallelism: ``context_parallel_size`` is passed to Megatron so that it
builds the CP groups and the DP groups *without* CP ranks (gradients are reduced
over DP x CP, token counts too).  Megatron's own CP attention is never engaged:
our core attention does not assert CP == 1, and the zig-zag split of the
block-diffusion layout is done by ``llada_cpt.parallel``.
"""
from __future__ import annotations

import logging
import math
import os
import random
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..config.schema import ParallelConfig
from ..errors import ConfigError

__all__ = ["ParallelInfo", "initialize", "destroy", "check_world_size", "wrap_ddp", "device"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits; ``dp`` excludes CP (Megatron's data-parallel size)."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    backend: str
    megatron_patches: tuple = ()  # names of the applied Megatron patches


def device() -> torch.device:
    """The device tensors of this rank live on."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_host(values: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """All-reduce a small tensor (counters, flags, stats) wherever it lives; returns a copy on the CPU.

    Why: NCCL reduces device tensors only ("No backend type associated with device type cpu") and
    gloo is for host tensors, so the values travel to the device the backend reduces on and come
    back.  ``values`` itself is left unchanged.  Without a process group: the values, on the CPU.
    """
    if not dist.is_initialized():
        return values.cpu()
    where = torch.device("cpu") if dist.get_backend(group) == "gloo" else device()
    out = values.to(where, copy=True)
    dist.all_reduce(out, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return out.cpu()


def check_world_size(parallel_cfg: ParallelConfig, world_size: int) -> int:
    """Data-parallel size left by ``world_size``; a :class:`ConfigError` naming the sizes if none fits."""
    p = parallel_cfg
    sizes = dict(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
    )
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"parallel.{name}={value} must be >= 1")
    tp, pp, cp, ep = sizes  # the names, in the order above
    model = _divisor_of_world(world_size, sizes, (tp, pp, cp))
    # experts are sharded over expert-TP x EP ranks inside each pipeline stage (Megatron's rule)
    _divisor_of_world(world_size, sizes, (tp, ep, pp))
    return world_size // model


def _divisor_of_world(world_size: int, sizes: Dict[str, int], names: Sequence[str]) -> int:
    """The product of the named sizes; a :class:`ConfigError` naming each factor unless it divides the world."""
    product = math.prod(sizes[n] for n in names)
    if world_size % product:
        factors = " x ".join(f"{n} ({sizes[n]})" for n in names)
        raise ConfigError(
            f"world size {world_size} is not divisible by {factors} = {product}; "
            "change the parallel sizes or the number of processes"
        )
    return product


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(backend: str) -> None:
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:  # plain `python ...`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend=backend, init_method="env://")


def initialize(parallel_cfg: ParallelConfig, seed: int, backend: Optional[str] = None) -> ParallelInfo:
    """Initialise torch.distributed (if needed), Megatron's parallel state and RNG; idempotent per layout."""
    on_gpu = torch.cuda.is_available()
    backend = backend or ("nccl" if on_gpu else "gloo")
    from llada_cpt import megatron_patches

    patches: List[str] = megatron_patches.apply()  # CPU patches only without CUDA
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    _init_process_group(backend)
    world = dist.get_world_size()
    dp = check_world_size(parallel_cfg, world)

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    p = parallel_cfg
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=getattr(p, "virtual_pipeline_model_parallel_size", None),
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
    )
    # Megatron-LM's rule: stages get their own seed (else their layers would start equal);
    # TP ranks get theirs inside the tracker, DP replicas stay identical.
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)
    info = ParallelInfo(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=local_rank,
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        cp=p.context_parallel_size,
        ep=p.expert_model_parallel_size,
        dp=dp,
        backend=backend,
        megatron_patches=tuple(patches),
    )
    if info.rank == 0:
        log.info("parallel layout %s; megatron patches: %s", info, ", ".join(patches) or "none")
    return info


def destroy() -> None:
    """Tear down Megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model_chunks: Sequence[torch.nn.Module], parallel_cfg: ParallelConfig, bucket_size: Optional[int] = None):
    """Megatron DDP around each chunk (fp32 grad buffers; the first chunk owns the buckets).

    DDP provides ``param.main_grad``, the DP reduction and the per-token gradient
    scaling used by ``finalize_model_grads``; the distributed optimizer shards
    those buffers when ``parallel.use_distributed_optimizer``.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    return [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # only the first chunk's buckets may start reducing early (Megatron-LM rule)
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(model_chunks)
    ]

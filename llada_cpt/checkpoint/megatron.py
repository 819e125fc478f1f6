"""Atomic, resumable, reshardable checkpoints on Megatron ``dist_checkpointing`` (torch_dist).

Layout of ``save_dir``::

    iter_0000100/          one complete checkpoint (renamed from iter_0000100.tmp when done)
        metadata.json, common.pt, *.distcp   Megatron dist_checkpointing
        rng/rank_00000.pt  per-rank RNG states (restored when the layout matches)
        config.yaml        the resolved config of the run
        metrics.json       iteration, consumed tokens, validation loss / perplexity (for top-k merge)
    latest                 name of the newest complete checkpoint, replaced atomically, written last

A crash at any point leaves ``latest`` pointing at a complete checkpoint.  The
optimizer uses the ``fully_reshardable`` format, saved per role (dense / expert,
:mod:`llada_cpt.checkpoint.optimizer_state`), so a checkpoint saved with one
TP/PP/DP/EP layout loads into another.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from torch.distributed.checkpoint.api import CheckpointException

from ..config.loader import dump_config
from ..errors import reraise_disk_full
from ..files import write_atomic
from ..model.wrappers import unwrap
from . import selection
from .optimizer_state import OPTIM_METADATA, load_optimizer_state, optimizer_sharded_state_dict
from .paths import CONFIG_FILE, LATEST, MEGATRON_CONFIG, METRICS_FILE, CheckpointError, checkpoint_name, read_metrics
from .verify import damaged, require_complete

__all__ = ["save_checkpoint", "load_checkpoint", "write_metrics", "apply_retention"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _model_sharded_state_dict(model_chunks: List[torch.nn.Module]) -> dict:
    chunks = [unwrap(m) for m in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(chunks)}


def write_metrics(path: str | Path, metrics: dict) -> None:
    """Merge ``metrics`` into ``metrics.json`` atomically (validation may come after the save)."""
    if _rank() != 0:
        return
    data = {**read_metrics(path), **metrics}
    write_atomic(Path(path) / METRICS_FILE, json.dumps(data, indent=2, sort_keys=True))


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


@contextlib.contextmanager
def _disk_full_stops_cleanly(root: Path, tmp: Path):
    """A save that runs out of space: remove its partial directory and stop with one line.

    Any rank that sees the error removes ``tmp`` (the others may be killed by the
    launcher before they get there); ``latest`` was not touched yet.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # DCP's CheckpointException (a BaseException) wraps the OSError, or its text
        shutil.rmtree(tmp, ignore_errors=True)
        previous = _latest_name(root)
        keep = f"`latest` still names {previous}" if previous else "there is no earlier checkpoint"
        reraise_disk_full(err, f"saving checkpoint {tmp.name[:-4]} in {root}",
                          f"removed the partial {tmp.name}, {keep}; free space and run the same command again "
                          "to resume from it")
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict) and _rank() not in failures:
            # DCP's collective write check: the cause is another rank's, whose one line the launcher
            # prints; give it the time to get there first (the launcher then stops this rank)
            time.sleep(5)
            raise CheckpointError(f"saving checkpoint {tmp.name[:-4]} in {root} failed on another rank (its "
                                  f"message says why); removed the partial {tmp.name}, {keep}") from err
        raise


def _latest_name(save_dir: Path) -> Optional[str]:
    pointer = Path(save_dir) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    model_chunks: List[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    state: dict,
    config: Any,
    metrics: Optional[dict] = None,
) -> Path:
    """Collective save; returns the final directory.  ``latest`` moves only after it is complete."""
    root = Path(save_dir)
    final = root / checkpoint_name(iteration)
    tmp = root / (final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer_sharded_state_dict(optimizer, sharded, is_loading=False)
    sharded["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    sharded["state"] = state
    with _disk_full_stops_cleanly(root, tmp):
        dist_checkpointing.save(sharded, str(tmp), content_metadata=OPTIM_METADATA)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        with _disk_full_stops_cleanly(root, tmp):
            (tmp / CONFIG_FILE).write_text(dump_config(config))
            world = dist.get_world_size() if dist.is_initialized() else 1
            (tmp / METRICS_FILE).write_text(json.dumps(
                {"iteration": iteration, "world_size": world, **(metrics or {})}, indent=2, sort_keys=True))
        if final.exists():  # re-reaching an iteration after resuming from an older one
            old = root / (final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        write_atomic(root / LATEST, final.name + "\n", durable=True)
    _barrier()
    return final


def load_checkpoint(
    path: str | Path,
    model_chunks: List[torch.nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict:
    """Load into the given (possibly differently parallelised) model; returns the saved loop state."""
    path = Path(path)
    if not (path / MEGATRON_CONFIG).is_file():
        raise CheckpointError(f"`{path}` is not a Megatron dist checkpoint (no metadata.json); pass an iter_* "
                              "directory or a run directory with a `latest` file")
    require_complete(path, resume=optimizer is not None)  # one line naming the checkpoint, not an EOFError per rank
    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer_sharded_state_dict(optimizer, sharded, is_loading=True)
    try:
        loaded = dist_checkpointing.load(sharded, str(path))  # also returns the common (non-sharded) items
    except (EOFError, OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError,
            CheckpointException) as err:  # (DCP's CheckpointException is a BaseException)
        raise damaged(path, err) from err
    chunks = [unwrap(m) for m in model_chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(chunks):
            m.load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        # per role (dense / expert) so EP sizes can change; own Adam `step` per parameter: te_absent patch
        load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if restore_rng and rng_file.is_file() and read_metrics(path).get("world_size") == world:
        try:
            rng = torch.load(rng_file, weights_only=False)
        except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as err:
            raise damaged(path, err) from err
        _set_rng_state(rng)
    return dict(loaded.get("state") or {})


def apply_retention(save_dir: str | Path, keep_last: int, keep_best: int, metric: str = "val_ppl") -> list[Path]:
    """Rank 0 applies :func:`llada_cpt.checkpoint.selection.apply_retention` (keep the newest ``keep_last``,
    the best ``keep_best`` by ``metric`` as a top-k merge would pick them, and ``latest``); other ranks return []."""
    if _rank() != 0:
        return []
    return selection.apply_retention(save_dir, keep_last, keep_best, metric)

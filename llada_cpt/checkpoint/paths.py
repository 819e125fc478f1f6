"""Where a run's checkpoints are: ``latest``, ``iter_*`` names, ``metrics.json`` - no Megatron import.

Offline tools (merge, conversion front ends, the CLI's argument checks) need these
paths but not Megatron-Core, whose import costs ~1.5 s and ~150 MB of RSS
(``benchmarks/results/merge.md``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import UserError

__all__ = ["CheckpointError", "LATEST", "MEGATRON_CONFIG", "COMMON_FILE", "DCP_METADATA", "CONFIG_FILE", "METRICS_FILE",
           "EMBEDDING_KEY", "checkpoint_name", "latest_checkpoint", "list_checkpoints", "read_metrics",
           "read_saved_config", "resolve_checkpoint"]

# The names of a run directory and of one checkpoint, defined once for every reader and writer.
LATEST = "latest"  # the run directory's pointer to its newest complete checkpoint
MEGATRON_CONFIG = "metadata.json"  # Megatron dist_checkpointing's marker: written last, so its presence means complete
COMMON_FILE = "common.pt"  # Megatron's non-sharded state
DCP_METADATA = ".metadata"  # torch DCP's index of the stored chunks
CONFIG_FILE = "config.yaml"  # the resolved config of the run that saved it
METRICS_FILE = "metrics.json"  # iteration, tokens, validation metrics (what top-k selection ranks)
EMBEDDING_KEY = "embedding.word_embeddings.weight"  # the (padded) word embedding: its rows are the stored vocabulary



class CheckpointError(UserError):
    """A checkpoint (or a run's) is missing, incomplete, damaged, or lacks what the command needs.

    The one error type of every checkpoint reader (paths, verify, io, selection, inspect); a
    :class:`UserError`, so the CLI prints its one line and exits 2."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(save_dir: Optional[str | Path]) -> Optional[Path]:
    """The checkpoint ``latest`` points at, or None when there is none yet."""
    if not save_dir:
        return None
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(save_dir) / pointer.read_text().strip()
    if not (path / MEGATRON_CONFIG).is_file():
        raise CheckpointError(f"{pointer} names `{path.name}`, which is not a complete checkpoint; "
                        "point `latest` at an existing iter_* directory or remove it to start fresh")
    return path


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``*.tmp`` leftovers are ignored)."""
    root = Path(save_dir)
    return sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / MEGATRON_CONFIG).is_file())


def _damaged_file(f: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"`{f}` is damaged ({type(err).__name__}); use another checkpoint of the run "
                           "(`llada-cpt checkpoint verify` shows what else is wrong)")


def read_metrics(path: str | Path) -> dict:
    """A checkpoint's ``metrics.json`` (``{}`` when it has none)."""
    f = Path(path) / METRICS_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except (ValueError, OSError) as err:
        raise _damaged_file(f, err) from None
    return data if isinstance(data, dict) else {}


def read_saved_config(path: str | Path) -> Optional[dict]:
    """The ``config.yaml`` saved with a checkpoint, as plain data (``{}`` if empty); None when it has none.

    The one reader of a checkpoint's saved config for merge, conversion, vocabulary checks and ``init_from``
    (typed :class:`~llada_cpt.config.schema.Config` readers build on it)."""
    import yaml  # (only the readers of a saved config pay for it)

    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        return None
    try:
        data = yaml.safe_load(f.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise _damaged_file(f, err) from None
    if data is not None and not isinstance(data, dict):
        raise _damaged_file(f, TypeError(f"YAML {type(data).__name__}, not a mapping"))
    return data or {}


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory (follows ``latest``) or an iter_* directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint `{p}` does not exist; pass a run directory or an iter_* directory")
    if (p / MEGATRON_CONFIG).is_file():
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointError(f"`{p}` holds no checkpoint (no `latest` file and no metadata.json)")
    return found

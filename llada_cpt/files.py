"""All-or-nothing, durable file writes: the one atomic writer of the project, and fsync.

A result (a checkpoint's ``latest`` pointer or ``metrics.json``, generated JSONL,
a benchmark table) is written to a hidden temporary file in the same folder and
renamed over the target, so a crash or a full disk never leaves a partial file
where a reader would take it for complete.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

__all__ = ["write_atomic", "fsync_path", "fsync_tree"]


def write_atomic(path: Union[str, os.PathLike], text: str, durable: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary sibling and a rename; on error nothing changes.

    ``durable``: fsync the data before the rename, for files a restart relies on (``latest``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fsync_path(path: str | Path) -> None:
    """fsync one file or directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory under ``path`` (and ``path`` itself)."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)

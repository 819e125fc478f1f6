"""Writing a torch_dist checkpoint region by region, each region computed only when it is written.

The write side of :mod:`.io` (same format facts): the top-k merge produces one
region at a time, so peak memory is one region
and the output is byte-for-byte a checkpoint Megatron's ``dist_checkpointing``
loads.  Single process, no ``torch.distributed`` initialisation.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, TensorWriteData, WriteItem, WriteItemType

from ..files import fsync_tree
from .io import TORCH_DIST, Region, TensorInfo
from .paths import COMMON_FILE, MEGATRON_CONFIG

__all__ = ["write_order", "write_torch_dist", "regions_bytes", "start_writeback"]


def write_order(tensors: Sequence[TensorInfo]) -> List[Tuple[TensorInfo, Region]]:
    """The order in which :func:`write_torch_dist` asks for regions (its plan order), for producers
    that compute ahead."""
    return [(t, r) for t in tensors for r in t.chunks]


class _LazySavePlanner(SavePlanner):
    """A DCP save plan whose tensors are computed only when the writer asks for them.

    DCP's writer calls ``resolve_data`` item by item, in plan order, right before
    serialising it, in this thread (``thread_count=1``); with one file per item (see
    :func:`write_torch_dist`) a written region is released before the next one is
    produced, so a producer may reuse its output buffer.  (DCP's own writer threads
    are not used: one that fails dies silently and the save completes without its items.)
    """

    def __init__(self, tensors: Sequence[TensorInfo], objects: Dict[str, bytes],
                 produce: Callable[[TensorInfo, Region], torch.Tensor]):
        self.tensors = {t.key: t for t in tensors}
        self.objects = objects
        self.produce = produce
        self.order = write_order(tensors)
        self.position = {(t.key, r.offsets): i for i, (t, r) in enumerate(self.order)}
        self.produced = 0

    def set_up_planner(self, state_dict=None, storage_meta=None, is_coordinator: bool = False) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self.objects]
        for t, r in self.order:
            items.append(WriteItem(
                index=MetadataIndex(t.key, r.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(r.offsets), sizes=torch.Size(r.sizes)),
                    properties=TensorProperties(dtype=t.dtype),
                    size=torch.Size(t.shape),
                ),
            ))
        return SavePlan(items)

    def create_global_plan(self, all_plans: List[SavePlan]) -> Tuple[List[SavePlan], Metadata]:
        md: Dict[str, object] = {k: BytesStorageMetadata() for k in self.objects}
        for t in self.tensors.values():
            md[t.key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=t.dtype),
                size=torch.Size(t.shape),
                chunks=[ChunkStorageMetadata(torch.Size(r.offsets), torch.Size(r.sizes)) for r in t.chunks],
            )
        return all_plans, Metadata(state_dict_metadata=md)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        key = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.objects[key])
        t, region = self.order[self.position[(key, tuple(write_item.index.offset))]]
        data = self.produce(t, region)
        if tuple(data.shape) != region.sizes or data.dtype != t.dtype:
            raise AssertionError(f"{t.key}: produced {tuple(data.shape)} {data.dtype}, "
                                 f"expected {region.sizes} {t.dtype}")
        self.produced += 1
        return data.contiguous()


def _dcp_save(planner: SavePlanner, writer: dcp.FileSystemWriter) -> None:
    """``dcp.save`` in this process only, re-raising the producer's own exception.

    DCP wraps any failure (even KeyboardInterrupt) in a ``CheckpointException``;
    unwrapping keeps user errors printable by the CLI and Ctrl-C a Ctrl-C.
    """
    kwargs = {"no_dist": True} if "no_dist" in inspect.signature(dcp.save).parameters else {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.save({}, storage_writer=writer, planner=planner, **kwargs)
    except CheckpointException as err:
        causes = [f[0] for f in err.failures.values() if isinstance(f, tuple) and isinstance(f[0], BaseException)]
        if len(causes) == 1:
            raise causes[0] from None
        raise


def write_torch_dist(
    path: str | Path,
    tensors: Sequence[TensorInfo],
    produce: Callable[[TensorInfo, Region], torch.Tensor],
    objects: Optional[Dict[str, bytes]] = None,
    common: Optional[dict] = None,
) -> None:
    """Write a torch_dist checkpoint that ``dist_checkpointing.load`` reads, one region at a time.

    ``produce(tensor, region)`` returns that region's values (``tensor.dtype``);
    ``objects`` are ShardedObject byte items copied verbatim; ``common`` is
    saved as ``common.pt``.  ``path`` must be an existing empty directory.
    Everything is fsync'ed before this returns, so a rename afterwards is
    crash-safe; the fsyncs come at the end, letting the kernel write back
    while later regions are still being computed.
    """
    path = Path(path)
    # One file per item: DCP's writer keeps every tensor of a file alive until the
    # file is closed, so a single file per rank would hold the whole model.
    writer = dcp.FileSystemWriter(str(path), single_file_per_rank=False, sync_files=False,
                                  thread_count=1, per_thread_copy_ahead=0)
    _start_writeback_on_close(writer)
    planner = _LazySavePlanner(tensors, dict(objects or {}), produce)
    with _without_crc32():
        _dcp_save(planner, writer)
    if planner.produced != len(planner.order):
        raise RuntimeError(f"checkpoint_io: {planner.produced} of {len(planner.order)} regions were written; "
                           f"the checkpoint in {path} is incomplete")
    torch.save(common or {}, path / COMMON_FILE)
    # the same fields as megatron.core.dist_checkpointing.core.CheckpointingConfig
    (path / MEGATRON_CONFIG).write_text(json.dumps({
        "sharded_backend": TORCH_DIST, "sharded_backend_version": 1,
        "common_backend": "torch", "common_backend_version": 1,
    }))
    fsync_tree(path)


def start_writeback(path: str | Path) -> None:
    """Ask the kernel to start writing ``path``'s dirty pages to disk now, without waiting.

    ``POSIX_FADV_DONTNEED`` starts asynchronous write-back of the file's dirty pages
    (and drops its clean ones: an output file is not read again), so the final
    fsync of a multi-GB output mostly finds the work done.  A hint only: errors
    and platforms without ``posix_fadvise`` are ignored.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextlib.contextmanager
def _without_crc32():
    """``torch.save`` without the zip CRC-32 of every record, for the duration of a write.

    The CRC took a third of the merge's write time (0.25 s per 0.8 GB) and protects
    nothing here: ``torch.load`` (so Megatron's and DCP's loaders) never checks it -
    PyTorch builds miniz with ``MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS``.  Public
    option (``torch.serialization.set_crc32_options``, torch >= 2.6); older torch: unchanged.
    """
    get = getattr(torch.serialization, "get_crc32_options", None)
    set_ = getattr(torch.serialization, "set_crc32_options", None)
    if get is None or set_ is None:
        yield
        return
    before = get()
    set_(False)
    try:
        yield
    finally:
        set_(before)


def _start_writeback_on_close(writer: dcp.FileSystemWriter) -> None:
    """Make ``writer`` call :func:`start_writeback` on each file it finishes (overlaps the final fsync)."""
    fs = getattr(writer, "fs", None)
    create = getattr(fs, "create_stream", None)
    if create is None:  # another torch layout: no hint, same result
        return

    @contextlib.contextmanager
    def create_stream(path, mode):
        with create(path, mode) as stream:
            yield stream
        if "w" in mode:
            start_writeback(path)

    fs.create_stream = create_stream


def regions_bytes(tensors: Iterable[TensorInfo]) -> int:
    """Total stored bytes of ``tensors``."""
    return sum(r.numel * t.dtype.itemsize for t in tensors for r in t.chunks)

"""Streaming reads of Megatron ``dist_checkpointing`` (torch_dist) checkpoints, one region at a time.

``dist_checkpointing.save``/``load`` move a whole state dict at once and need a
process group; offline tools (top-k merge, format conversion) must instead touch
one tensor region at a time so that memory stays bounded by a few layers, never
the model.  This module reads the on-disk format with ``torch.distributed.checkpoint``
(DCP) storage readers directly, in a single process, without initialising
``torch.distributed``; :mod:`.writer` writes it the same way.

Format facts this relies on (checked with megatron-core 0.16.1 and torch 2.13; only public
DCP classes are used):

* ``metadata.json`` names the backends (``sharded_backend: torch_dist``);
  ``common.pt`` is a ``torch.save`` of the non-sharded items; ``.metadata`` and
  ``*.distcp`` are a plain DCP checkpoint.
* DCP keys are Megatron ``ShardedTensor.key`` values *without* the state-dict
  prefix: ``embedding.word_embeddings.weight``,
  ``decoder.layers.mlp.linear_fc1.weight`` (all layers stacked on a leading axis,
  one stored chunk per layer and TP/EP shard), ``optimizer.state.exp_avg.<...>``
  for optimizer state.  ``ShardedObject`` values (e.g. ``..._extra_state``) are
  byte items keyed ``<key>/shard_<offsets>_<shape>``.
* Every chunk is stored in the *global* tensor's coordinates, so a region can be
  assembled from any saved layout (TP=2 halves, per-layer chunks, ...).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)

from .paths import COMMON_FILE, EMBEDDING_KEY, MEGATRON_CONFIG, CheckpointError
from .raw import RawSource, stored_layout

__all__ = ["Region", "TensorInfo", "TorchDistCheckpoint", "stored_embedding", "add_scaled", "TORCH_DIST"]

TORCH_DIST = "torch_dist"


@dataclass(frozen=True)
class Region:
    """A box in a global tensor: the unit that is read, averaged and written."""

    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n

    def intersect(self, other: "Region") -> Optional["Region"]:
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a + n, b + m) for a, n, b, m in zip(self.offsets, self.sizes, other.offsets, other.sizes))
        if any(b <= a for a, b in zip(lo, hi)):
            return None
        return Region(lo, tuple(b - a for a, b in zip(lo, hi)))


@dataclass(frozen=True)
class TensorInfo:
    """One global tensor of a checkpoint and the chunks it is stored as (found in a checkpoint's index, or
    to be written by :func:`llada_cpt.checkpoint.writer.write_torch_dist`, each chunk produced on demand)."""

    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    chunks: Tuple[Region, ...]

    @property
    def nbytes(self) -> int:
        return Region((), self.shape).numel * self.dtype.itemsize


_SLAB = 1 << 20  # elements per cast slab: small enough to stay in cache, large enough to amortise


def add_scaled(dest: torch.Tensor, src: torch.Tensor, alpha: float) -> None:
    """``dest += alpha * src``, casting ``src`` slab by slab when the dtypes differ.

    A mixed-dtype ``add_`` (bf16 into fp32) takes PyTorch's slow casting path,
    and ``src.float()`` would allocate a whole extra region; casting 1M-element
    slabs into one reused buffer is 3-5x faster and bounded in memory.
    """
    if src.dtype == dest.dtype or dest.numel() <= _SLAB or not (dest.is_contiguous() and src.is_contiguous()):
        dest.add_(src, alpha=alpha)
        return
    d, s = dest.view(-1), src.view(-1)
    buf = torch.empty(_SLAB, dtype=dest.dtype)
    for i in range(0, d.numel(), _SLAB):
        part = d[i:i + _SLAB]
        tmp = buf[:part.numel()]
        tmp.copy_(s[i:i + _SLAB])
        part.add_(tmp, alpha=alpha)


class _AddInto(torch.Tensor):
    """Target handed to DCP's reader that turns its ``copy_(piece)`` into ``dest += alpha * piece``.

    The reader deserialises each stored chunk and copies it into the tensor the
    planner resolves; accumulating through a scratch buffer would hold one more
    region in memory.  This storage-less wrapper supports only what the reader
    does with a target (``detach``, ``size``, ``copy_``); anything else raises,
    so a reader that changed its access pattern fails loudly, never silently.
    """

    @staticmethod
    def __new__(cls, dest: torch.Tensor, alpha: float):
        t = torch.Tensor._make_wrapper_subclass(cls, dest.shape, dtype=dest.dtype, device=dest.device)
        t.dest, t.alpha, t.added = dest, alpha, False
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        self = args[0]
        if func is torch.Tensor.detach:
            return self
        if func is torch.Tensor.copy_:
            add_scaled(self.dest, args[1], self.alpha)
            self.added = True
            return self
        if func in (torch.Tensor.size, torch.Tensor.dim):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise RuntimeError(f"checkpoint_io: the DCP reader used `{getattr(func, '__name__', func)}` on a read "
                           "target; this torch version reads differently, update _AddInto")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"checkpoint_io: `{func}` reached a storage-less read target; update _AddInto")


class _RegionPlanner(LoadPlanner):
    """Routes each stored piece of one region into ``out`` (copy) or adds ``alpha * piece`` to it.

    Only ``resolve_tensor``/``commit_tensor``/``load_bytes`` are used: the plan is
    built by :meth:`TorchDistCheckpoint.read_region`, not by DCP's planning passes.
    """

    def __init__(self, out: Optional[torch.Tensor], alpha: Optional[float]):
        self.out, self.alpha = out, alpha
        self.data: Optional[bytes] = None

    def _view(self, item: ReadItem) -> torch.Tensor:
        view = self.out
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        view = self._view(read_item)
        return view if self.alpha is None else _AddInto(view, self.alpha)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        if isinstance(tensor, _AddInto) and not tensor.added:
            raise RuntimeError(f"checkpoint_io: the DCP reader did not copy `{read_item.storage_index.fqn}` "
                               "into its target; this torch version reads differently, update _AddInto")

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.data = value.getvalue()

    # Unused planning passes (the abstract interface requires them).
    def set_up_planner(self, *args, **kwargs) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError

    def create_global_plan(self, global_plan):
        raise NotImplementedError

    def finish_plan(self, central_plan):
        raise NotImplementedError


class TorchDistCheckpoint:
    """Read-only view of one torch_dist checkpoint directory; the DCP metadata is read once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_file = self.path / MEGATRON_CONFIG
        if not cfg_file.is_file():
            raise CheckpointError(
                f"`{self.path}` is not a Megatron dist checkpoint (no {MEGATRON_CONFIG}); pass an iter_* "
                "directory or a run directory with a `latest` file")
        try:
            backend = json.loads(cfg_file.read_text()).get("sharded_backend")
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{cfg_file} is not valid JSON ({err}); the checkpoint is damaged") from None
        if backend != TORCH_DIST:
            raise CheckpointError(
                f"`{self.path}` uses the `{backend}` backend; only `{TORCH_DIST}` checkpoints are supported "
                "(re-save it with dist_checkpointing's torch_dist strategy)")
        self._reader = dcp.FileSystemReader(str(self.path))
        try:
            self.metadata: Metadata = self._reader.read_metadata()
        except FileNotFoundError:
            raise CheckpointError(
                f"`{self.path}` has no `.metadata` file; the checkpoint is incomplete") from None
        except Exception as err:  # noqa: BLE001 - an unpickling failure can raise nearly anything
            raise CheckpointError(f"`{self.path}/.metadata` cannot be read ({type(err).__name__}: {err}); "
                                        "the checkpoint is damaged (`llada-cpt checkpoint verify` checks it)") from None
        self._reader.set_up_storage_reader(self.metadata, True)
        self.tensors: Dict[str, TensorInfo] = {}
        self.objects: List[str] = []
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                chunks = tuple(Region(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)
                self.tensors[key] = TensorInfo(key, tuple(md.size), md.properties.dtype, chunks)
            elif isinstance(md, BytesStorageMetadata):
                self.objects.append(key)

        self._fds: Dict[str, int] = {}
        self._layouts: Dict[Tuple[str, Tuple[int, ...]], object] = {}

    def __repr__(self) -> str:
        return f"TorchDistCheckpoint({str(self.path)!r})"

    def close(self) -> None:
        """Close the files opened by :meth:`raw_source`."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def raw_source(self, key: str, region: Region) -> Optional[RawSource]:
        """Where ``region``'s values lie as one run of bytes in a stored file, or None.

        Found when one stored chunk holds the whole region, the region is a contiguous
        run of that chunk (leading indices fixed, one dimension cut, trailing ones
        whole), and the chunk is stored plainly (see :mod:`llada_cpt.checkpoint.raw`).
        Otherwise the region must be read with :meth:`read_region`.
        """
        info = self.tensors[key]
        chunk = next((c for c in info.chunks if c.intersect(region) == region), None)
        if chunk is None:
            return None
        inner = tuple(o - c for o, c in zip(region.offsets, chunk.offsets))
        cut = [d for d, (s, c) in enumerate(zip(region.sizes, chunk.sizes)) if s != c]
        if cut and any(region.sizes[d] != 1 for d in range(cut[-1])):  # dims after the last cut are whole
            return None
        layout = self._layout(key, chunk)
        if layout is None or layout.shape != chunk.sizes or layout.dtype != info.dtype:
            return None
        start, step = 0, 1
        for d in reversed(range(len(chunk.sizes))):
            start += inner[d] * step
            step *= chunk.sizes[d]
        return RawSource(self._fds[self._storage(key, chunk).relative_path],
                         layout.offset + start * info.dtype.itemsize, info.dtype, region.numel)

    def _storage(self, key: str, chunk: Region):
        return self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]

    def _layout(self, key: str, chunk: Region):
        """The stored layout of one chunk (parsed once), or None when it is not plainly stored."""
        cache_key = (key, chunk.offsets)
        if cache_key not in self._layouts:
            layout = None
            storage = self._storage(key, chunk)
            if not getattr(storage, "transform_descriptors", None):  # compression / extensions: DCP reads it
                fd = self._fds.get(storage.relative_path)
                if fd is None:
                    fd = self._fds[storage.relative_path] = os.open(self.path / storage.relative_path, os.O_RDONLY)
                layout = stored_layout(fd, storage.offset, storage.length)
            self._layouts[cache_key] = layout
        return self._layouts[cache_key]

    def common(self) -> dict:
        """The non-sharded items (``common.pt``): loop state, scheduler, model extras."""
        f = self.path / COMMON_FILE
        return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else {}

    def read_region(self, key: str, region: Region, out: torch.Tensor, alpha: Optional[float] = None) -> None:
        """Fill ``out`` (shaped like ``region``) with the stored values, or add ``alpha *`` them to it.

        Assembles the region from every stored chunk it overlaps, whatever layout
        saved it.  Copies and additions cast to ``out.dtype``.
        """
        info = self.tensors[key]
        if tuple(out.shape) != region.sizes:
            raise ValueError(f"out has shape {tuple(out.shape)}, region {region.sizes}")
        items, covered = [], 0
        for chunk in info.chunks:
            part = chunk.intersect(region)
            if part is None:
                continue
            covered += part.numel
            items.append(ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(key, region.offsets),
                dest_offsets=torch.Size(p - r for p, r in zip(part.offsets, region.offsets)),
                storage_index=MetadataIndex(key, chunk.offsets),
                storage_offsets=torch.Size(p - c for p, c in zip(part.offsets, chunk.offsets)),
                lengths=torch.Size(part.sizes),
            ))
        if covered != region.numel:
            raise CheckpointError(
                f"`{key}` in {self.path} is incomplete: its stored chunks cover {covered} of the {region.numel} "
                f"elements at offsets {region.offsets}; the checkpoint is damaged")
        self._reader.read_data(LoadPlan(items), _RegionPlanner(out, alpha)).wait()

    def read_tensor(self, key: str) -> torch.Tensor:
        """The whole global tensor (for small tensors and tests)."""
        info = self.tensors[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_region(key, Region((0,) * len(info.shape), info.shape), out)
        return out

    def read_object(self, key: str) -> bytes:
        """The raw bytes of a ``ShardedObject`` item (kept verbatim: they are torch.save blobs)."""
        planner = _RegionPlanner(None, None)
        item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(key), dest_offsets=torch.Size((0,)),
                        storage_index=MetadataIndex(key), storage_offsets=torch.Size((0,)),
                        lengths=torch.Size((0,)))
        self._reader.read_data(LoadPlan([item]), planner).wait()
        assert planner.data is not None
        return planner.data


def stored_embedding(path: str | Path) -> Optional[TensorInfo]:
    """The stored word embedding (rows = the vocabulary padded by the TP size that saved it, dtype), read from the
    checkpoint's metadata alone; None when it holds none.  The one reader of the stored vocabulary rows."""
    ckpt = TorchDistCheckpoint(path)
    try:
        return ckpt.tensors.get(EMBEDDING_KEY)
    finally:
        ckpt.close()

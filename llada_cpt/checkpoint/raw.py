"""Direct reads of the tensors in a torch_dist checkpoint: where a chunk's bytes lie, and a slab-wise weighted sum.

``torch.distributed.checkpoint`` stores every tensor chunk as one ``torch.save``
archive (an uncompressed zip) inside a ``.distcp`` file, and its reader loads a
chunk by ``torch.load``-ing the whole archive into fresh memory before copying
the wanted box out.  For a streaming merge that extra copy, and the page faults
of fresh multi-100-MB buffers, cost more than the arithmetic
(``benchmarks/results/merge.md``).  When a chunk is stored plainly
(uncompressed, no DCP transforms, little-endian, C-contiguous) its raw bytes are
located once - the zip's local header plus a restricted unpickling of
``data.pkl`` that builds no tensor - and slabs of them are ``preadv``'d straight
into small reused buffers.  Anything unexpected makes :func:`stored_layout`
return ``None`` and the caller reads through DCP instead, so an unfamiliar
format costs speed, never correctness.

No Megatron import here: this is format reading and arithmetic only.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["StoredLayout", "RawSource", "stored_layout", "read_exact", "weighted_sum", "SLAB_ELEMENTS"]

# elements per slab: the fp32 accumulator and the read buffers of one slab stay in the L2/L3
# cache (measured on an EPYC: 256k elements ran 1.5-2x faster than 1M or region-sized passes)
SLAB_ELEMENTS = 1 << 18
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_MAGIC = 0x04034B50

# the legacy storage class names torch.save pickles, and their dtypes
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class StoredLayout:
    """A stored chunk: C-contiguous values of ``dtype`` and ``shape`` at byte ``offset`` of its file."""

    offset: int
    dtype: torch.dtype
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class RawSource:
    """``numel`` elements of ``dtype`` at byte ``offset`` of the open file ``fd``."""

    fd: int
    offset: int
    dtype: torch.dtype
    numel: int


class _FileSlice(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, seekable, for :class:`zipfile.ZipFile`."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = base + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        data = os.pread(self.fd, n, self.start + self.pos)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _Storage:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    return storage, storage_offset, tuple(size), tuple(stride)


class _LayoutUnpickler(pickle.Unpickler):
    """Reads a ``torch.save``'d tensor's description and builds nothing: any other object is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"not a plain tensor: {module}.{name}")

    def persistent_load(self, pid):
        kind, storage, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return storage.dtype, str(key), int(numel)


def _entry_offset(fd: int, start: int, info: zipfile.ZipInfo) -> int:
    """File offset of an uncompressed zip entry's data (after its local header, whose padding
    ``torch.save`` uses to align the data, so the central directory's sizes do not tell)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{info.filename} is compressed")
    fields = _LOCAL_HEADER.unpack(os.pread(fd, _LOCAL_HEADER.size, start + info.header_offset))
    if fields[0] != _LOCAL_MAGIC:
        raise ValueError(f"no local header for {info.filename}")
    return start + info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]


def _entry_bytes(fd: int, start: int, info: zipfile.ZipInfo) -> bytes:
    """An uncompressed entry's bytes, read directly: ``ZipFile.read`` would check a CRC-32, which
    ``torch.save`` may leave out (``set_crc32_options(False)``; ``torch.load`` never checks it)."""
    data = os.pread(fd, info.file_size, _entry_offset(fd, start, info))
    if len(data) != info.file_size:
        raise ValueError(f"{info.filename} is truncated")
    return data


def stored_layout(fd: int, start: int, length: int) -> Optional[StoredLayout]:
    """Where the values of the ``torch.save`` archive at ``[start, start + length)`` lie, or None.

    None when the archive is not a plain uncompressed, little-endian, C-contiguous
    tensor (the caller then reads it with ``torch.load`` through DCP).
    """
    try:
        archive = zipfile.ZipFile(_FileSlice(fd, start, length))
        entries = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in entries if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            return None
        prefix = pickles[0][:-len("data.pkl")]
        order = entries.get(prefix + "byteorder")
        byteorder = _entry_bytes(fd, start, order).strip() if order is not None else sys.byteorder.encode()
        if byteorder != b"little":
            return None
        rebuilt = _LayoutUnpickler(io.BytesIO(_entry_bytes(fd, start, entries[pickles[0]]))).load()
        (dtype, key, storage_numel), storage_offset, shape, stride = rebuilt
        info = entries.get(prefix + "data/" + key)
        if info is None:
            return None
        expected, step = [], 1
        for s in reversed(shape):
            expected.append(step)
            step *= s
        numel = step
        if tuple(reversed(expected)) != stride and numel > 1:
            return None  # strided storage: not one run of bytes
        if storage_offset + numel > storage_numel or info.file_size != storage_numel * dtype.itemsize:
            return None
        return StoredLayout(_entry_offset(fd, start, info) + storage_offset * dtype.itemsize, dtype, shape)
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, TypeError, KeyError, EOFError, struct.error):
        return None


def read_exact(fd: int, buffer: torch.Tensor, offset: int) -> None:
    """Fill the contiguous CPU tensor ``buffer`` with the bytes at ``offset`` of ``fd``."""
    view = memoryview(buffer.view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise EOFError(f"file ends {len(view) - done} bytes before the end of a stored tensor")
        done += n


class _Slabs:
    """One worker's slab buffers: a read buffer in the stored dtype, the accumulator and a cast buffer."""

    def __init__(self, dtype: torch.dtype, acc_dtype: torch.dtype):
        self.read = torch.empty(SLAB_ELEMENTS, dtype=dtype)
        self.acc = torch.empty(SLAB_ELEMENTS, dtype=acc_dtype)
        self.cast = torch.empty(SLAB_ELEMENTS, dtype=acc_dtype)


def _sum_range(sources: Sequence[RawSource], weights: Sequence[float], out: torch.Tensor, lo: int, hi: int,
               scratch: dict) -> None:
    """``out[lo:hi] = sum_i weights[i] * source_i[lo:hi]``, slab by slab, accumulated in ``promote(dtype, fp32)``."""
    dtype = out.dtype
    acc_dtype = torch.promote_types(dtype, torch.float32)
    key = (dtype, acc_dtype)
    if key not in scratch:
        scratch[key] = _Slabs(dtype, acc_dtype)
    slabs = scratch[key]
    item = dtype.itemsize
    for start in range(lo, hi, SLAB_ELEMENTS):
        n = min(SLAB_ELEMENTS, hi - start)
        # the stored dtype is the accumulator's (fp32/fp64): accumulate in `out` itself, no casts
        acc = out[start:start + n] if acc_dtype == dtype else slabs.acc[:n]
        read = slabs.read[:n]
        for i, (src, w) in enumerate(zip(sources, weights)):
            target = acc if (i == 0 and acc_dtype == dtype) else read
            read_exact(src.fd, target, src.offset + start * item)
            if i == 0:
                if target is not acc:
                    acc.copy_(read)
                acc.mul_(w)
            elif acc_dtype == dtype:
                acc.add_(read, alpha=w)
            else:  # same ops as io.add_scaled: cast into a buffer, then add
                cast = slabs.cast[:n]
                cast.copy_(read)
                acc.add_(cast, alpha=w)
        if acc_dtype != dtype:
            out[start:start + n].copy_(acc)


def weighted_sum(sources: Sequence[RawSource], weights: Sequence[float], out: torch.Tensor,
                 pool: Optional[ThreadPoolExecutor] = None, scratch: Optional[Sequence[dict]] = None) -> None:
    """``out = sum_i weights[i] * source_i`` for a contiguous floating ``out`` of the sources' dtype.

    With a ``pool``, the element range is cut into one stripe per ``scratch`` dict
    (one per worker: its slab buffers, kept between calls); reads and tensor ops
    release the GIL.  The result is the same bits whatever the number of workers.
    """
    numel = out.numel()
    flat = out.view(-1)
    for src in sources:
        if src.numel != numel or src.dtype != out.dtype:
            raise ValueError(f"source of {src.numel} {src.dtype} for an output of {numel} {out.dtype}")
    scratch = list(scratch) if scratch else [{}]
    workers = len(scratch) if pool is not None else 1
    if workers == 1 or numel <= SLAB_ELEMENTS:
        _sum_range(sources, weights, flat, 0, numel, scratch[0])
        return
    stripe = -(-numel // workers)
    stripe = -(-stripe // SLAB_ELEMENTS) * SLAB_ELEMENTS  # whole slabs per stripe
    futures = [pool.submit(_sum_range, sources, weights, flat, lo, min(lo + stripe, numel), scratch[k])
               for k, lo in enumerate(range(0, numel, stripe))]
    for fut in futures:
        fut.result()

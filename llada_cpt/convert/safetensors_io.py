"""Hugging Face checkpoint files: streaming reads and size-bounded sharded writes.

Reads go through ``safetensors.safe_open`` (memory-mapped), one tensor - or a
row range of one tensor (the vocabulary slice of a TP rank) - at a time, so an
import never holds more of the HF model than the tensor being converted.
Writes buffer at most one shard (``max_shard_bytes``) before flushing it, and
name the files the way ``transformers`` does (``model.safetensors`` or
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .errors import ConvertError, ConvertInputMissing

__all__ = ["HFCheckpoint", "ShardedWriter", "parse_size", "read_config", "INDEX_FILE", "SINGLE_FILE"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConvertError(f"size `{text}` is not understood; write e.g. 5GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConvertError(f"cannot read {what} {path} ({err}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{what} {path} must hold a JSON object")
    return data


class HFCheckpoint:
    """A Hugging Face model directory: ``config.json`` and its safetensors weights."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConvertInputMissing(
                f"Hugging Face model directory `{self.path}` does not exist; pass a directory holding "
                "config.json and *.safetensors (e.g. a `huggingface-cli download` target)")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise ConvertInputMissing(f"`{self.path}` has no config.json; pass a Hugging Face model directory")
        self.config: dict = _read_json(cfg, "model config")
        self._files = self._weight_map()
        self._handles: Dict[Path, object] = {}

    def _weight_map(self) -> Dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index} has no `weight_map`; re-save the model with save_pretrained")
            files = {name: self.path / f for name, f in weight_map.items()}
            missing = sorted({str(f) for f in files.values() if not f.is_file()})
            if missing:
                raise ConvertInputMissing(f"{index} names missing shard files: {', '.join(missing[:3])}; "
                                          "download the complete checkpoint")
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            legacy = sorted(p.name for p in self.path.glob("pytorch_model*.bin"))
            hint = (f" (found {legacy[0]}: re-save it with `save_pretrained(dir, safe_serialization=True)`)"
                    if legacy else "")
            raise ConvertInputMissing(f"`{self.path}` holds no *.safetensors weights{hint}")
        from safetensors import safe_open

        files: Dict[str, Path] = {}
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    files[name] = shard
        return files

    def _handle(self, name: str):
        if name not in self._files:
            raise ConvertError(f"tensor `{name}` is missing from the checkpoint in `{self.path}`; "
                               "the files do not match config.json")
        f = self._files[name]
        if f not in self._handles:
            from safetensors import safe_open

            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f]

    def names(self) -> List[str]:
        return list(self._files)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor, without reading the others."""
        return self._handle(name).get_slice(name)[start:stop]


class ShardedWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes`` (one shard buffered)."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 10**9):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: List[Tuple[Path, List[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor `{name}` written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # own, contiguous storage: safetensors refuses views sharing memory
        self._buffer[name] = tensor.detach().to("cpu").contiguous().clone()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> List[str]:
        """Flush, name the shards like ``transformers`` and write the index; returns the file names."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        weight_map: Dict[str, str] = {}
        for (tmp, tensors), final in zip(self._shards, names):
            os.replace(tmp, self.out_dir / final)
            weight_map.update({t: final for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names


def read_config(path: str | os.PathLike) -> Optional[dict]:
    """``config.json`` of a directory, or None when it has none."""
    f = Path(path) / "config.json"
    return _read_json(f, "model config") if f.is_file() else None

"""What every benchmark script shares: the environment header of a result and its atomic write
(:func:`llada_cpt.files.write_atomic`, re-exported here).

Lives in the package (not under ``benchmarks/``) so that scripts in any folder
(``benchmarks/*.py``, ``kernels/bench_attention.py``) import it the same way,
whether run as ``python path/to/script.py`` or as a module.
"""
from __future__ import annotations

import datetime
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import torch

from .files import write_atomic

__all__ = ["write_atomic", "cpu_model", "device_name", "utc_timestamp", "package_versions", "environment",
           "status_cell", "unavailable_notes"]

UNAVAILABLE = "unavailable: "


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: Optional[Union[str, torch.device]] = None) -> str:
    """The GPU's name for a CUDA device, else the CPU model; ``None``: CUDA when there is one."""
    device = torch.device(device) if device is not None else None
    on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    if on_gpu:
        return torch.cuda.get_device_name(device)
    return cpu_model()


def utc_timestamp() -> str:
    """Minute-resolution UTC time, the ``date`` of every result."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def package_versions(dists: Iterable[str]) -> Dict[str, Optional[str]]:
    """Installed version of each distribution (``None`` when absent), read from metadata without importing it."""
    out: Dict[str, Optional[str]] = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def status_cell(backend: str, status: str, notes: Dict[str, str]) -> str:
    """A row's status for a Markdown table: the long reason of ``unavailable: why`` moves into ``notes``.

    The reasons (install hints) would make the table unreadable; :func:`unavailable_notes`
    lists them once per backend under it.
    """
    if status.startswith(UNAVAILABLE):
        notes[backend] = status[len(UNAVAILABLE):]
        return "unavailable (see below)"
    return status


def unavailable_notes(notes: Dict[str, str]) -> List[str]:
    """The Markdown lines listing why each backend is unavailable (none when all ran)."""
    if not notes:
        return []
    return ["", "Unavailable here:", ""] + [f"- `{backend}`: {why}" for backend, why in notes.items()]


def environment(device: Optional[Union[str, torch.device]] = None, packages: Iterable[str] = ()) -> dict:
    """The header of a benchmark result: where, when and with what it ran.

    ``device`` is the one the benchmark measures (``"cpu"`` for CPU-only ones even on
    a GPU machine); ``packages`` adds the versions of further distributions.  The load
    average is there because timings on a shared machine are noisy.
    """
    cudnn = torch.backends.cudnn
    return {
        "date": utc_timestamp(),
        "host": platform.node(),
        "device": device_name(device),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn.version() if cudnn.is_available() else None,
        **package_versions(packages),
    }

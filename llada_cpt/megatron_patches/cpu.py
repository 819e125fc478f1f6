"""Run Megatron-Core on CPU processes with the gloo backend.

Megatron-Core assumes CUDA throughout: ``device="cuda"`` / ``torch.cuda.current_device()``
tensor factories, CUDA streams and events, NVTX ranges, a CUDA RNG tracker, host
copies of MoE token counts and a few TE-only GEMMs.  Each patch below is a small,
documented function that removes one such assumption, so that the *real*
``GPTModel``, ``parallel_state``, DDP, the distributed optimizer, the pipeline
schedules, ``dist_checkpointing`` and the MoE alltoall dispatcher run unchanged
on 1-4 CPU processes (tests, the embedded demo).

Targets megatron-core >= 0.16.1, < 0.20 (each patch notes what it touches); all of
them are skipped when CUDA is available.  :func:`apply` is idempotent and returns
the names of the applied patches (logged at start-up).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, List

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["apply", "applied_patches", "CudaToCpuMode"]

_PATCHES: List[tuple[str, Callable[[], None]]] = []
_APPLIED: List[str] = []
_MODE: "CudaToCpuMode | None" = None


def _patch(fn: Callable[[], None]) -> Callable[[], None]:
    _PATCHES.append((fn.__name__.lstrip("_"), fn))
    return fn


def applied_patches() -> List[str]:
    """Names of the patches applied in this process (empty on GPU)."""
    return list(_APPLIED)


def apply(force: bool = False) -> List[str]:
    """Apply every CPU patch once; a no-op when CUDA is available (unless ``force``)."""
    if torch.cuda.is_available() and not force:
        return []
    for name, fn in _PATCHES:
        if name not in _APPLIED:
            fn()
            _APPLIED.append(name)
    return applied_patches()


# --------------------------------------------------------------------------- devices


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.split(":")[0] == "cuda"
    # a bare int is an accelerator index (Megatron passes torch.cuda.current_device())
    return isinstance(dev, int) and not isinstance(dev, bool)


_CPU = torch.device("cpu")


def _cuda_type_name(name: str) -> str:
    return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") and ".cuda." not in name else name


class CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device arguments of every torch call to ``cpu``.

    Covers ``device=`` keywords of every call (factories, ``Tensor.new_*``,
    ``Tensor.to``), a positional device of ``Tensor.to`` and ``pin_memory=True``
    (pinning needs CUDA).  ``tensor.type()`` reports the CUDA type name
    (``torch.cuda.FloatTensor``): Megatron's optimizers sort parameters by it and
    reject anything else.  It stays pushed for the whole process.

    Limit: a mode is popped while its handler runs, so Python-level torch functions
    it intercepts run their body without it -- notably ``torch.autograd.backward``
    (recent torch dispatches it to modes), i.e. everything in the backward pass.  Megatron's
    backward code allocates with ``torch.cuda.current_device()``, which
    ``cuda_runtime_stubs`` makes return the cpu device.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        elif func is torch.Tensor.pin_memory:
            return args[0]
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cuda_type_name(func(*args))
        return func(*args, **kwargs)


@_patch
def _cuda_device_mode() -> None:
    """Map ``cuda`` device arguments to ``cpu`` (all versions; a global TorchFunctionMode).

    Megatron allocates with ``device=torch.cuda.current_device()`` or ``"cuda"`` in
    hundreds of places; rewriting the argument once is smaller than patching each.
    """
    global _MODE
    _MODE = CudaToCpuMode()
    _MODE.__enter__()


class _Stream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _Stream()

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _Nvtx:
    @staticmethod
    def range_push(*a, **k):
        return 0

    @staticmethod
    def range_pop(*a, **k):
        return 0

    @staticmethod
    def mark(*a, **k):
        pass

    @staticmethod
    @contextlib.contextmanager
    def range(*a, **k):
        yield


def _cpu_seed(seed: int) -> None:
    # not torch.manual_seed: that calls torch.cuda.manual_seed_all (left untouched: lazy, harmless)
    torch.default_generator.manual_seed(int(seed))


@_patch
def _cuda_runtime_stubs() -> None:
    """Harmless ``torch.cuda`` runtime calls (all versions).

    ``current_device`` returns the *cpu device* rather than an index: Megatron passes it
    as ``device=`` also in autograd backward functions (MoE all-to-all, sequence-parallel
    gathers), where the device mode is not active (see :class:`CudaToCpuMode`);
    ``synchronize``/``set_device``/``empty_cache`` do nothing; streams, events and
    NVTX ranges are no-ops; the "CUDA" RNG calls act on the CPU generator so that
    Megatron's RNG tracker forks the CPU state (see ``rng_tracker_on_cpu``).
    """
    c = torch.cuda
    c.current_device = lambda: _CPU
    c.device_count = lambda: 1
    c.set_device = lambda *a, **k: None
    c.synchronize = lambda *a, **k: None
    c.empty_cache = lambda: None
    c.reset_peak_memory_stats = lambda *a, **k: None
    c.memory_allocated = lambda *a, **k: 0
    c.max_memory_allocated = lambda *a, **k: 0
    c.memory_reserved = lambda *a, **k: 0
    c.max_memory_reserved = lambda *a, **k: 0
    c.memory_stats = lambda *a, **k: {}
    c.Stream = _Stream
    c.Event = _Stream
    c.current_stream = lambda *a, **k: _Stream()
    c.default_stream = lambda *a, **k: _Stream()
    c.stream = lambda *a, **k: contextlib.nullcontext()
    c.set_stream = lambda *a, **k: None
    c.nvtx = _Nvtx
    c.get_rng_state = lambda *a, **k: torch.get_rng_state()
    c.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    c.manual_seed = _cpu_seed
    c.random.get_rng_state = c.get_rng_state
    c.random.set_rng_state = c.set_rng_state


@_patch
def _tensor_and_module_cuda_identity() -> None:
    """``Tensor.cuda()`` / ``Module.cuda()`` return ``self`` (all versions)."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self


@_patch
def _no_torch_compile() -> None:
    """Run ``torch.compile``-decorated fusions eagerly (megatron.core.jit, all versions).

    ``megatron.core.jit.jit_fuser`` is ``torch.compile`` on torch >= 2.2 and is
    applied at import time; on CPU inductor would need a C++ toolchain and minutes
    of compilation for a few element-wise fusions.  Dynamo's global switch is read
    at call time, so it also covers functions decorated before this patch.
    """
    import torch._dynamo

    torch._dynamo.config.disable = True


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


@_patch
def _rng_tracker_on_cpu() -> None:
    """Megatron's CUDA RNG tracker forks the CPU generator (tensor_parallel/random.py).

    ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read and write the CPU
    generator, so ``model_parallel_cuda_manual_seed`` still gives TP-rank-specific
    streams for TP-split initialisation and dropout.  Because the tracker and the
    CPU state are now the same generator, its "CPU RNG state changed within GPU
    RNG context" warning is expected and filtered out.
    """
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    logging.getLogger(mrandom.__name__).addFilter(_DropForkWarning())


@_patch
def _moe_host_copies() -> None:
    """MoE token counts become host values on CPU too (moe_utils / token_dispatcher, 0.16-0.19).

    ``maybe_move_tensor_to_cpu(t, as_numpy=True)`` converts only CUDA tensors, so on
    CPU the alltoall dispatcher keeps its split sizes as tensors and
    ``all_to_all_single`` rejects them; the replacement also converts CPU tensors.
    The dispatcher imported the function by name, so both bindings are replaced.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

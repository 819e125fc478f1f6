"""FlexAttention backend: a ``BlockMask`` built from the BDLM rule, so empty tiles are skipped.

The mask_mod evaluates :func:`llada_cpt.diffusion.masks.bdlm_allowed` (the one
definition of the mask) on per-position tables of (document, block, half),
precomputed for the layout's queries (local positions under context
parallelism, mapped to global indices) and for all keys.  MDLM and plain causal
layouts are expressed in the same table form (see :func:`position_tables`), so
one mask_mod covers every layout.  Most tiles of the BDLM mask are empty (the
x_0 -> x_t quadrant entirely, the upper triangles, other documents), and
FlexAttention never touches them; fully allowed tiles skip the mask_mod.

The ``BlockMask`` is counted in closed form from the layout
(:mod:`llada_cpt.kernels.block_mask`: milliseconds at any L, nothing compiled).
On CUDA ``flex_attention`` runs compiled (``LLADA_FLEX_COMPILE=0`` turns that off
for debugging).  On CPU the eager implementation runs (forward only: torch has
no FlexAttention backward on CPU), which is what the CPU tests use.

Benchmark knobs (environment, read at every call so that one process can
compare them; defaults unchanged until measured, see :class:`FlexOptions`):
``LLADA_FLEX_TILE`` (``128`` or ``128x64``: query x key tile; on an H100 tiles
under 128 need max-autotune, as torch's one default backward config there has
128-key blocks),
``LLADA_FLEX_BLOCK_MASK`` (``closed_form`` or ``create_block_mask``: torch's
builder, compiled on CUDA - the previous path), ``LLADA_FLEX_COMPILE_MODE``
(a ``torch.compile`` mode such as ``max-autotune-no-cudagraphs``) and
``LLADA_FLEX_KERNEL_BACKEND`` (``TRITON`` or ``FLASH``: FlexAttention's
FlashAttention-4 backend, needs ``flash-attn-4`` and the CuTe DSL).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import warnings
from typing import Optional, Tuple

import torch

from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.diffusion.masks import bdlm_allowed
from llada_cpt.errors import ConfigError

from .block_mask import closed_form_block_mask
from .layout_cache import LayoutCache
from .tiles import ATTENTION_TILE, TileSize, tile_pair

__all__ = [
    "NAME",
    "TILE",
    "BLOCK_MASK_CACHE",
    "FlexOptions",
    "unavailable_reason",
    "position_tables",
    "bdlm_mask_mod",
    "build_block_mask",
    "block_mask_for",
    "flex_attention_backend",
]

NAME = "flex"
TILE = ATTENTION_TILE  # BlockMask tile (query and key); FlexAttention's default sparse block
BLOCK_MASK_BUILDERS = ("closed_form", "create_block_mask")
KERNEL_BACKENDS = ("TRITON", "FLASH")
BLOCK_MASK_CACHE = LayoutCache()

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = create_block_mask = flex_attention = None


@dataclasses.dataclass(frozen=True)
class FlexOptions:
    """How the flex backend builds its mask and compiles its kernel (defaults: the measured best)."""

    tile: Tuple[int, int] = (TILE, TILE)  # (query, key) BlockMask tile
    block_mask: str = "closed_form"  # or "create_block_mask" (torch's builder: the previous path)
    compile_mode: Optional[str] = None  # torch.compile mode of flex_attention on CUDA
    kernel_backend: Optional[str] = None  # kernel_options BACKEND; None = torch's choice (Triton)

    @classmethod
    def from_env(cls) -> "FlexOptions":
        """Options from ``LLADA_FLEX_*`` (module docstring); a bad value is a ConfigError naming the fix."""
        env = os.environ
        tile = env.get("LLADA_FLEX_TILE", "").strip()
        try:
            parts = [int(t) for t in tile.lower().split("x")] if tile else [TILE]
            pair = tile_pair(parts[0] if len(parts) == 1 else tuple(parts))
        except ValueError:
            raise ConfigError(f"LLADA_FLEX_TILE={tile!r} is not a tile size; use e.g. 128 or 128x64") from None
        if any(t % 16 for t in pair):
            raise ConfigError(f"LLADA_FLEX_TILE={tile!r}: FlexAttention tiles must be multiples of 16 (e.g. 128x64)")
        builder = env.get("LLADA_FLEX_BLOCK_MASK", "closed_form")
        if builder not in BLOCK_MASK_BUILDERS:
            raise ConfigError(f"LLADA_FLEX_BLOCK_MASK={builder!r}; use one of {', '.join(BLOCK_MASK_BUILDERS)}")
        backend = env.get("LLADA_FLEX_KERNEL_BACKEND") or None
        if backend is not None and backend.upper() not in KERNEL_BACKENDS:
            raise ConfigError(f"LLADA_FLEX_KERNEL_BACKEND={backend!r}; "
                              f"use one of {', '.join(KERNEL_BACKENDS)} or unset it")
        return cls(tile=pair, block_mask=builder, compile_mode=env.get("LLADA_FLEX_COMPILE_MODE") or None,
                   kernel_backend=backend.upper() if backend else None)

    def kernel_options(self) -> Optional[dict]:
        """``kernel_options`` for ``flex_attention`` (None: torch's defaults)."""
        if self.kernel_backend is None:
            return None
        if self.kernel_backend == "FLASH":
            reason = flash_backend_unavailable_reason()
            if reason is not None:
                raise ConfigError(reason)
        return {"BACKEND": self.kernel_backend}


def flash_backend_unavailable_reason() -> Optional[str]:
    """Why FlexAttention's FlashAttention-4 backend cannot run here, or None."""
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions
    except ImportError:
        FlexKernelOptions = None
    if FlexKernelOptions is None or "BACKEND" not in getattr(FlexKernelOptions, "__annotations__", {}):
        return f"torch {torch.__version__} has no FlexAttention BACKEND option; unset LLADA_FLEX_KERNEL_BACKEND"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:
        found = False
    if not found:
        return ("LLADA_FLEX_KERNEL_BACKEND=FLASH needs FlashAttention-4 (pip install flash-attn-4, which brings "
                "nvidia-cutlass-dsl); unset LLADA_FLEX_KERNEL_BACKEND to use the Triton kernels")
    return None


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why this backend cannot train on ``device`` (default: CUDA if present), or None."""
    if flex_attention is None:
        return (
            f"FlexAttention is not in torch {torch.__version__}; install torch>=2.5 "
            "or set model.attention_backend=cudnn/reference"
        )
    device = torch.device(device) if device is not None else _default_device()
    if device.type != "cuda":
        return (
            "FlexAttention has no backward pass on CPU (forward only); "
            "use model.attention_backend=reference (or auto) on CPU"
        )
    if importlib.util.find_spec("triton") is None:
        return "FlexAttention on CUDA compiles Triton kernels but triton is not installed; pip install triton"
    return None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def position_tables(layout: AttentionLayout, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """``(q_doc, q_blk, q_noised, k_doc, k_blk, k_noised)`` for :func:`bdlm_allowed`.

    ``*_doc``/``*_blk`` are ``[b, n]`` int32, ``*_noised`` ``[n]`` bool, over the
    layout's queries (``global_index(local=True)``) and keys (all positions).
    MDLM is the x_t rule with one block per document (block 0, noised) - equal to
    the document mask; ``causal`` is the x_0 rule with block size 1 (as in
    :meth:`AttentionLayout.allowed`).
    """
    tables = []
    for local in (True, False):
        index = layout.global_index(local)
        doc, blk, noised = layout._attributes(index)
        if layout.mdlm:
            blk = torch.zeros_like(blk)
        tables += [doc.to(device, torch.int32), blk.to(device, torch.int32), noised.to(device)]
    return tuple(tables)


def bdlm_mask_mod(layout: AttentionLayout, device: torch.device):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` equal to ``layout.dense_mask()``."""
    q_doc, q_blk, q_noised, k_doc, k_blk, k_noised = position_tables(layout, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return bdlm_allowed(
            q_doc[b, q_idx], q_blk[b, q_idx], q_noised[q_idx],
            k_doc[b, kv_idx], k_blk[b, kv_idx], k_noised[kv_idx],
        )

    return mask_mod


def _use_compile(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("LLADA_FLEX_COMPILE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _compiled(fn, mode: Optional[str] = None):
    return torch.compile(fn, dynamic=False, mode=mode)


def build_block_mask(layout: AttentionLayout, device: torch.device, tile: TileSize = TILE,
                     builder: str = "closed_form") -> "BlockMask":
    """The ``BlockMask`` of ``layout`` for ``[Sq local queries, Sk keys]``, broadcast over heads.

    ``closed_form`` counts the tiles from the layout (no mask, no compile);
    ``create_block_mask`` is torch's builder (compiled on CUDA), kept to compare.
    """
    if create_block_mask is None:
        raise ConfigError(unavailable_reason(device))
    device = torch.device(device)
    mask_mod = bdlm_mask_mod(layout, device)
    if builder == "closed_form":
        return closed_form_block_mask(layout, device, mask_mod, tile)
    sq = layout.global_index(True).numel()
    sk = layout.global_index(False).numel()
    make = _compiled(create_block_mask) if _use_compile(device) else create_block_mask
    return make(mask_mod, layout.doc_ids.shape[0], None, sq, sk, device=device, BLOCK_SIZE=tile_pair(tile))


def block_mask_for(layout: AttentionLayout, device: torch.device, tile: TileSize = TILE,
                   builder: str = "closed_form") -> "BlockMask":
    """:func:`build_block_mask` through the per-step cache (all layers share one mask)."""
    device = torch.device(device)
    return BLOCK_MASK_CACHE.get(layout, (str(device), tile_pair(tile), builder),
                                lambda: build_block_mask(layout, device, tile, builder))


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> None:
    sq = layout.global_index(True).numel()
    sk = layout.global_index(False).numel()
    if q.shape[2] != sq or k.shape[2] != sk or v.shape[2] != sk:
        raise ValueError(
            f"attention layout describes {sq} queries x {sk} keys but got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)} ([b, heads, seq, dim]); pass the layout of this micro-batch "
            "(with this rank's local_positions under context parallelism)"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of key/value heads {k.shape[1]}")
    if layout.doc_ids.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"layout batch {layout.doc_ids.shape[0]} does not match the query batch {q.shape[0]}")


def flex_attention_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, softmax_scale: float
) -> torch.Tensor:
    """``q`` ``[b, hq, Sq, d]``, ``k``/``v`` ``[b, hkv, Sk, d]`` -> ``[b, hq, Sq, d]`` (GQA via enable_gqa)."""
    if flex_attention is None:
        raise ConfigError(unavailable_reason(q.device))
    _check_shapes(q, k, v, layout)
    if q.device.type != "cuda":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ConfigError(unavailable_reason(q.device))
        q, k, v = q.detach(), k.detach(), v.detach()  # torch refuses requires_grad inputs even under no_grad
    options = FlexOptions.from_env()
    block_mask = block_mask_for(layout, q.device, options.tile, options.block_mask)
    kwargs = dict(block_mask=block_mask, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
    if _use_compile(q.device):
        kernel_options = options.kernel_options()
        if kernel_options is not None:
            kwargs["kernel_options"] = kernel_options
        return _compiled(flex_attention, options.compile_mode)(q, k, v, **kwargs)
    with warnings.catch_warnings():  # "called without torch.compile": intended off CUDA
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, **kwargs)

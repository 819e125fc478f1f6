"""TransformerEngine ``DotProductAttention`` with the BDLM mask (needs TE: the NGC image).

Two ways to hand TE an arbitrary mask (TE's backend selection,
``dot_product_attention/utils.py``):

- ``bias`` (default): ``attn_mask_type="no_mask"`` + ``core_attention_bias_type=
  "post_scale_bias"`` with the ``[b, 1, Sq, Sk]`` additive bias of
  :mod:`llada_cpt.kernels.bias` ("b1ss"); TE then runs cuDNN fused attention.
- ``arbitrary``: ``attn_mask_type="arbitrary"`` with a boolean "masked out"
  tensor; TE only supports it in its *unfused* backend (materialised scores) -
  the baseline the LLaDA2.0 report compares against.

``LLADA_TE_MASK=arbitrary`` selects the second for the ``te`` backend; the
benchmark measures both.  Without TE every entry point raises a
:class:`~llada_cpt.errors.ConfigError` that names the fix.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch

from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.errors import ConfigError

from .bias import bias_for, masked_out_for

__all__ = ["NAME", "MODES", "unavailable_reason", "make_te_backend", "te_attention_backend", "import_error"]

NAME = "te"
MODES = ("bias", "arbitrary")


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken CUDA install
        return f"{type(exc).__name__}: {exc}"
    return None


def import_error() -> Optional[str]:
    """Why ``transformer_engine.pytorch`` cannot be imported here (None when it can); cached."""
    return _import_error()


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the TE backend cannot run here, with the fix; None when it can."""
    error = _import_error()
    if error is not None:
        return (
            "the te attention backend needs NVIDIA Transformer Engine, which is not importable here "
            f"({error}); install it on a CUDA machine (pip install --no-build-isolation "
            "'transformer_engine[pytorch]'), or run in the NGC PyTorch image (see Dockerfile), "
            "or pick another backend: model.attention_backend=flex, cudnn, reference or auto"
        )
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "the te attention backend needs a CUDA GPU; use model.attention_backend=reference (or auto) on CPU"
    return None


@functools.lru_cache(maxsize=None)
def _module(hq: int, hkv: int, d: int, scale: float, mode: str, device: str):
    """One TE ``DotProductAttention`` per shape (it holds no weights, only backend state)."""
    import transformer_engine.pytorch as te

    with torch.device(device):
        return te.DotProductAttention(
            num_attention_heads=hq,
            kv_channels=d,
            num_gqa_groups=hkv,
            attention_dropout=0.0,
            qkv_format="sbhd",
            attn_mask_type="no_mask" if mode == "bias" else "arbitrary",
            softmax_scale=scale,
        )


def make_te_backend(mode: str = "bias") -> Callable:
    """A backend callable using TE with the mask given as ``mode`` (one of :data:`MODES`)."""
    if mode not in MODES:
        raise ConfigError(f"TE mask mode `{mode}` is not one of {', '.join(MODES)}")

    def te_backend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, softmax_scale: float
    ) -> torch.Tensor:
        reason = unavailable_reason(q.device)
        if reason:
            raise ConfigError(reason)
        b, hq, sq, d = q.shape
        attn = _module(hq, k.shape[1], d, float(softmax_scale), mode, str(q.device))
        # [b, h, s, d] -> TE's sbhd (for the core module's tensors this undoes a permute: no copy)
        qs, ks, vs = (t.permute(2, 0, 1, 3).contiguous() for t in (q, k, v))
        if mode == "bias":
            bias = bias_for(layout, q.dtype, q.device)
            if bias.shape[0] != b:
                bias = bias.expand(b, *bias.shape[1:])
            out = attn(qs, ks, vs, core_attention_bias_type="post_scale_bias",
                       core_attention_bias=bias.contiguous())
        else:
            mask = masked_out_for(layout, q.device)
            out = attn(qs, ks, vs, attention_mask=mask, attn_mask_type="arbitrary")
        if out.shape[:2] != (sq, b):
            raise RuntimeError(f"unexpected TE output shape {tuple(out.shape)} for sbhd input {tuple(qs.shape)}")
        return out.view(sq, b, hq, -1).permute(1, 2, 0, 3)

    te_backend.__name__ = f"te_{mode}_attention"
    return te_backend


te_attention_backend = make_te_backend(os.environ.get("LLADA_TE_MASK", "bias"))

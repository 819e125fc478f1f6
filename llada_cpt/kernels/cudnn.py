"""cuDNN fused attention through PyTorch SDPA, with the BDLM mask as an additive bias.

What torch offers (read from ``aten/src/ATen/native/transformers``; see the
benchmarks README): ``can_use_cudnn_attention`` checks the mask's *shape*
(``check_attn_mask_shape``) but, unlike flash attention, does not reject masks;
a boolean mask is turned into an additive one (``convert_boolean_attn_mask_cudnn``,
finite ``-65504`` instead of ``-inf`` to dodge a cuDNN ``-inf`` issue); the
forward and backward expand a 4-D bias ``[b, 1, Sq, Sk]`` with its head
dimension kept at 1, i.e. broadcast over heads, so no per-head score matrix is
materialised; GQA is native (``enable_gqa``).  So the graph API of
nvidia-cudnn-frontend is not needed for correctness.

We pass the bias of :mod:`llada_cpt.kernels.bias` (built once per layout for all layers,
in the query dtype: torch PR #191612 reports fp32 masks being reinterpreted as
the io dtype by the cuDNN path).  It is ``[b, 1, Sq, Sk]`` at 2 bytes per pair
(512 MiB at 2L = 16384) and cuDNN still visits every tile: this backend saves
the score memory, not the masked FLOPs (FlexAttention saves both).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.errors import ConfigError

from .bias import bias_for

__all__ = ["NAME", "unavailable_reason", "cudnn_attention_backend"]

NAME = "cudnn"


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why cuDNN SDPA cannot run here (no CUDA, cuDNN < 9, GPU older than sm80), or None."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or not torch.cuda.is_available():
        return (
            "the cudnn attention backend needs a CUDA GPU; "
            "use model.attention_backend=reference (or auto) on CPU"
        )
    if not torch.backends.cudnn.is_available():
        return "this torch build has no cuDNN; install a CUDA torch wheel or use model.attention_backend=flex"
    version = torch.backends.cudnn.version() or 0
    if version < 90000:
        return f"cuDNN {version} is too old for fused attention (needs >= 9.0); upgrade torch or use flex"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"cuDNN fused attention needs sm80 or newer (this GPU is sm{major}{minor}); use flex or reference"
    try:
        from torch.nn.attention import SDPBackend

        SDPBackend.CUDNN_ATTENTION  # noqa: B018
    except (ImportError, AttributeError):
        return f"torch {torch.__version__} has no SDPA cuDNN backend; upgrade torch or use flex"
    return None


def cudnn_attention_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, softmax_scale: float
) -> torch.Tensor:
    """``q`` ``[b, hq, Sq, d]``, ``k``/``v`` ``[b, hkv, Sk, d]`` -> ``[b, hq, Sq, d]`` on cuDNN only.

    Pinned to the cuDNN kernel (no silent fallback to the math kernel, which
    would materialise the scores); if cuDNN rejects the inputs, torch's error says why.
    """
    reason = unavailable_reason(q.device)
    if reason:
        raise ConfigError(reason)
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(
            f"cuDNN fused attention needs bf16/fp16 inputs, got {q.dtype}; "
            "set train.precision=bf16 or use model.attention_backend=flex"
        )
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bias = bias_for(layout, q.dtype, q.device)
    if bias.shape[-2:] != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"attention layout describes {tuple(bias.shape[-2:])} (queries, keys) but got "
            f"{q.shape[2]} queries and {k.shape[2]} keys"
        )
    if bias.shape[0] != q.shape[0]:
        bias = bias.expand(q.shape[0], *bias.shape[1:])
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
        )

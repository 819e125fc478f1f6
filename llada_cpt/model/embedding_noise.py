"""Masked-embedding noise (DESIGN section 2): Gaussian noise on the embeddings of mask tokens.

For the first ``embedding_noise_steps`` optimizer steps, ``N(0, sigma^2)`` is
added to the embedding *output* at positions whose input token is ``mask_id``
in the noised copy ``x_t`` only (the first ``L`` tokens of the BDLM input, all
tokens in MDLM); ``sigma`` decays from ``embedding_noise_std`` to 0 (linear or
cosine).  Every other position is bit-identical to the noise-free forward.

The noise is a pure function (:func:`add_masked_embedding_noise`);
:class:`EmbeddingNoise` attaches it to a ``GPTModel`` with hooks and draws from
its own generator seeded by (seed, step, micro-batch call, DP x CP rank), so all
TP/PP ranks of a replica add the same noise, replicas add different noise, and
the default RNG stream is untouched.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config.choices import field_choices
from ..config.schema import DiffusionConfig
from ..diffusion.layout import AttentionLayout
from ..errors import ConfigError

__all__ = ["noise_std", "noised_positions", "layout_noise", "add_masked_embedding_noise", "EmbeddingNoise"]


def noise_std(step: int, std: float, steps: int, decay: str = "linear") -> float:
    """``sigma`` at optimizer ``step`` (0-based): ``std`` at 0, 0 from ``steps`` on."""
    decays = field_choices(DiffusionConfig, "embedding_noise_decay")
    if decay not in decays:
        raise ConfigError(f"diffusion.embedding_noise_decay `{decay}` is not one of {', '.join(decays)}")
    if steps <= 0 or std <= 0 or step >= steps:
        return 0.0
    frac = max(step, 0) / steps
    if decay == "linear":
        return std * (1.0 - frac)
    return std * 0.5 * (1.0 + math.cos(math.pi * frac))


def noised_positions(input_ids: torch.Tensor, layout: AttentionLayout, mask_id: int) -> torch.Tensor:
    """``[b, S]`` bool: mask tokens of the x_t copy (``input_ids`` holds this rank's tokens)."""
    is_xt = layout.global_index(local=True).to(input_ids.device) < layout.seq_length
    if layout.num_copies == 1:
        is_xt = torch.full_like(is_xt, layout.mdlm)  # MDLM input is x_t; a causal input has no x_t
    return (input_ids == mask_id) & is_xt.unsqueeze(0)


def layout_noise(layout: AttentionLayout, step: int, hidden: int, device: torch.device) -> torch.Tensor:
    """Standard-normal noise ``[S_local, b, h]`` drawn per row from ``layout.row_seeds`` and ``step``.

    Each row draws for the *global* input (``num_copies * L`` positions) and keeps
    this rank's positions, so the noise of a sample is the same under any DP / CP
    split or micro-batching.
    """
    index = layout.global_index(local=True).to(device)
    rows = []
    for seed in layout.row_seeds.tolist():
        g = torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + step * 10_007) % (2**63))
        full = torch.randn(layout.num_copies * layout.seq_length, hidden, generator=g, device=device)
        rows.append(full[index])
    return torch.stack(rows, dim=1)


def add_masked_embedding_noise(
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    sigma: float,
    generator: Optional[torch.Generator] = None,
    sequence_offset: int = 0,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``embeddings`` ``[n, b, h]`` plus ``sigma * N(0, 1)`` where ``positions`` (``[b, S]``) is True.

    The noise is drawn for all ``S`` positions and rows ``sequence_offset : +n`` are
    used, so a sequence-parallel slice gets exactly its part of the full draw.
    """
    if sigma <= 0.0:
        return embeddings
    n = embeddings.shape[0]
    full = (positions.shape[1],) + tuple(embeddings.shape[1:])
    if noise is None:  # ``noise``: a precomputed standard-normal draw of the full shape
        noise = torch.randn(full, generator=generator, dtype=torch.float32, device=embeddings.device)
    noise = noise[sequence_offset : sequence_offset + n] * sigma
    where = positions[:, sequence_offset : sequence_offset + n].transpose(0, 1).unsqueeze(-1).to(embeddings.device)
    # contiguous: the transposed position mask would otherwise give a strided result, which
    # pipeline-parallel send/recv (gloo, NCCL) rejects
    return torch.where(where, (embeddings.float() + noise).to(embeddings.dtype), embeddings).contiguous()


class EmbeddingNoise:
    """Hooks that add masked-embedding noise to a ``GPTModel``'s embedding output.

    ``attach(model)`` registers a pre-hook on the model (to see the layout in
    ``attention_mask``) and a forward hook on ``model.embedding``; call
    ``set_step(step)`` once per optimizer step.  With sequence parallelism the
    embedding output holds this TP rank's slice of the sequence; the noise is
    drawn for the full sequence and sliced, so it does not depend on TP.
    """

    def __init__(self, cfg: DiffusionConfig, mask_id: int, seed: int = 0, dp_rank: Optional[int] = None):
        noise_std(0, cfg.embedding_noise_std, cfg.embedding_noise_steps, cfg.embedding_noise_decay)  # validate
        self.cfg = cfg
        self.mask_id = int(mask_id)
        self.seed = int(seed)
        self.dp_rank = dp_rank  # None: Megatron's DP x CP rank, looked up at the first draw
        self.step = 0
        self._calls = 0
        self._layout: Optional[AttentionLayout] = None
        self._handles = []

    @property
    def sigma(self) -> float:
        c = self.cfg
        return noise_std(self.step, c.embedding_noise_std, c.embedding_noise_steps, c.embedding_noise_decay)

    def set_step(self, step: int) -> None:
        self.step = int(step)
        self._calls = 0

    def attach(self, model: torch.nn.Module) -> "EmbeddingNoise":
        """Hook ``model`` (a bare ``GPTModel``; unwrap DDP first).  No-op without an embedding."""
        embedding = getattr(model, "embedding", None)
        if embedding is None or not getattr(model, "pre_process", True):
            return self
        self._handles.append(model.register_forward_pre_hook(self._remember_layout, with_kwargs=True))
        self._handles.append(embedding.register_forward_hook(self._add_noise, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _remember_layout(self, module, args, kwargs):
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        self._layout = mask if isinstance(mask, AttentionLayout) else None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.dp_rank is None:
            from megatron.core import parallel_state

            initialized = parallel_state.model_parallel_is_initialized()
            self.dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True) if initialized else 0
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + self.step * 10_007 + self._calls * 101 + self.dp_rank) % (2**63))
        self._calls += 1
        return g

    def _add_noise(self, module, args, kwargs, output):
        sigma = self.sigma
        if sigma <= 0.0 or self._layout is None:
            return output
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        positions = noised_positions(input_ids, self._layout, self.mask_id)
        offset = 0
        if output.shape[0] != positions.shape[1]:  # sequence parallel: this TP rank's slice
            from megatron.core import parallel_state

            offset = parallel_state.get_tensor_model_parallel_rank() * output.shape[0]
        if self._layout.row_seeds is not None:
            noise = layout_noise(self._layout, self.step, output.shape[-1], output.device)
            return add_masked_embedding_noise(output, positions, sigma, sequence_offset=offset, noise=noise)
        return add_masked_embedding_noise(output, positions, sigma, self._generator(output.device), offset)

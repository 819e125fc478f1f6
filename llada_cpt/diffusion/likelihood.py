"""Log-likelihood of a continuation under the block-diffusion model: the ELBO and its Monte-Carlo estimator.

A request is ``context + continuation`` (token ids, one sequence starting at
position 0, blocks ``b(k) = k // B`` as in the sampler).  The context stays
clean; only continuation positions are ever masked.  For block ``b`` holding
``n_b`` continuation positions the block-diffusion ELBO of the continuation is

    ELBO = sum_b  E_{t ~ U(0,1]}  E_{M_b ~ Bernoulli(t)^{n_b}}  [ (1/t) sum_{k in M_b} log p(x_k | x_t) ]

where the model sees the masked block ``b`` and the *clean* earlier blocks (the
``[x_t ; x_0]`` layout), so a block's term depends on that block's mask only.
Integrating ``t`` out for a mask of ``m`` of ``n`` positions gives the weight
``B(m, n - m + 1) = (m-1)! (n-m)! / n!`` per mask pattern (:func:`pattern_weight`),
the form the tests enumerate exactly.

The estimator (:func:`sample_block_masks`) is LLaDA's discrete form, drawn per
block: ``l ~ U{1..n_b}``, mask ``l`` positions chosen uniformly, weight
``n_b / l`` on each.  Same expectation as the continuous-``t`` form (``P(|M| = m)
= 1/(n+1)`` and ``E[1/t | m] = (n+1)/m``), lower variance: never an empty block,
no ``1/t`` spikes, and independent draws per block.  A block with a single
continuation position always masks it with weight 1, so at block size 1 the
estimate is exact and deterministic.  Pure PyTorch (no Megatron).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator, List, Sequence, Tuple

import torch

__all__ = ["continuation_blocks", "sample_block_masks", "pattern_weight", "mask_patterns", "request_seed",
           "is_deterministic"]


def continuation_blocks(context_length: int, continuation_length: int, block_size: int) -> torch.Tensor:
    """Block index (``k // B``, counted from position 0 of the request) of each continuation position."""
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    return torch.arange(context_length, context_length + continuation_length) // block_size


def is_deterministic(blocks: torch.Tensor) -> bool:
    """True when every block holds at most one continuation position (the estimate is then exact)."""
    return bool(blocks.numel() == 0 or torch.unique(blocks, return_counts=True)[1].max() <= 1)


def sample_block_masks(blocks: torch.Tensor, num_samples: int, generator: torch.Generator
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(masked [S, n] bool, weight [S, n] float64)``: one masked set per block and sample, weight ``n_b / l``."""
    n = blocks.numel()
    masked = torch.zeros(num_samples, n, dtype=torch.bool)
    weight = torch.zeros(num_samples, n, dtype=torch.float64)
    for b in torch.unique(blocks).tolist():
        cols = (blocks == b).nonzero().squeeze(1)
        nb = cols.numel()
        for s in range(num_samples):
            count = int(torch.randint(1, nb + 1, (1,), generator=generator))
            chosen = cols[torch.randperm(nb, generator=generator)[:count]]
            masked[s, chosen] = True
            weight[s, chosen] = nb / count
    return masked, weight


def pattern_weight(masked_count: int, length: int) -> float:
    """``E_t[t^{m-1} (1-t)^{n-m}] = B(m, n-m+1)``: the ELBO weight of one mask pattern with ``m`` of ``n`` masked."""
    m, n = masked_count, length
    if not 1 <= m <= n:
        return 0.0
    return math.factorial(m - 1) * math.factorial(n - m) / math.factorial(n)


def mask_patterns(length: int) -> Iterator[List[bool]]:
    """Every non-empty mask pattern of ``length`` positions (``2^length - 1`` of them)."""
    for code in range(1, 2 ** length):
        yield [bool(code >> i & 1) for i in range(length)]


def request_seed(seed: int, context: Sequence[int], continuation: Sequence[int]) -> int:
    """A 63-bit seed from the request's tokens: its noise does not depend on batching or on the rank split."""
    h = hashlib.sha256(f"{int(seed)}|{','.join(map(str, context))}|{','.join(map(str, continuation))}".encode())
    return int.from_bytes(h.digest()[:8], "little") & (2 ** 63 - 1)

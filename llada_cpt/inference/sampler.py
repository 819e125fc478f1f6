"""Block-diffusion sampler (DESIGN section 2): blocks left to right, iterative unmasking inside a block.

Block boundaries are those of training and of the RL replay
(:mod:`llada_cpt.rl.trajectory`): ``b(pos) = pos // B`` counted from position 0
of the sequence, prompt included, so the first generated block is partial when
the prompt length is not a multiple of ``B`` (its prompt part is clean).

Per block, each *step* is one forward: every still-masked position of the
block is predicted, and every position whose confidence exceeds
``threshold`` is committed; when fewer than ``min_tokens_per_step`` do, the
most confident ones are committed up to that number (low-confidence
fallback).  After ``max_steps_per_block`` steps the rest is committed.  A
finished block is clean; its keys/values are computed from the clean tokens
(the ``x_0`` rule) in the *next* forward, fused with the first step of the next
block, and cached (:mod:`.kv_cache`).  The prompt's whole blocks are
prefilled the same way, in the first forward.

Batches: rows are left-padded by *whole blocks* so that every row's first
generated block is the same batch block; padding is never attended to and
RoPE positions are per row, so a row's tokens do not depend on the other
rows (greedy decoding gives the same tokens alone or batched).  All rows move
to the next block together; a row whose block is complete idles (commits
nothing, its step counter does not advance) until the others finish theirs.
A row stops after the block in which it commits EOS (the block is finished
first), at ``max_new_tokens`` or at the context length; stopped rows leave the
batch.

Step map: for each generated token, the decoding step of *its* sequence
(0-based, counting the forwards in which that sequence committed tokens)
that committed it; non-decreasing across blocks, and its number of distinct
values is the number of decoding forwards of that sequence.

Under tensor parallelism every rank runs this loop in lockstep on identical
(gathered) logits with an identically seeded generator, so all ranks make the
same decisions.

This module depends only on the :class:`Denoiser` interface and the KV cache;
running it on a Megatron model is :func:`llada_cpt.inference.generation.generate`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence

import torch

from ..errors import ConfigError, UserError
from .kv_cache import KVCache

__all__ = [
    "SamplerConfig",
    "GenerationResult",
    "GenerationStats",
    "GenerationBatch",
    "PromptTooLongError",
    "Denoiser",
    "filter_logits",
    "propose_tokens",
    "select_commits",
    "token_budget",
    "sample",
]


class PromptTooLongError(UserError, ValueError):
    """A prompt leaves no room to generate within the model's context."""


@dataclass
class SamplerConfig:
    """Decoding settings.  ``mask_id``/``eos_id``/``vocab_size``/``context_length`` left at None are
    taken from the model loaded by :func:`~llada_cpt.inference.engine.load_model_for_inference`."""

    block_size: int = 32
    threshold: float = 0.95  # commit every masked position whose confidence exceeds it (> 1: never)
    min_tokens_per_step: int = 1  # low-confidence fallback: commit at least this many per step
    max_steps_per_block: Optional[int] = None  # None = block size; when reached, commit the rest
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_at_eos: bool = True
    use_cache: bool = True  # False: recompute the whole prefix at every step (reference, benchmark)
    batch_size: Optional[int] = None  # rows per batch; None = all prompts at once
    seed: int = 0  # sampling generator (identical on all TP ranks)
    mask_id: Optional[int] = None
    eos_id: Optional[int] = None  # None: no EOS stopping
    vocab_size: Optional[int] = None  # ids >= vocab_size (vocabulary padding) are never produced
    context_length: Optional[int] = None  # positions available per sequence (prompt + generation)

    def validate(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block size must be >= 1, got {self.block_size}")
        if not self.threshold >= 0:
            raise ConfigError(f"threshold must be >= 0 (> 1 disables it), got {self.threshold}")
        if self.min_tokens_per_step < 1:
            raise ConfigError(f"min_tokens_per_step must be >= 1, got {self.min_tokens_per_step}")
        if self.max_steps_per_block is not None and self.max_steps_per_block < 1:
            raise ConfigError(f"max_steps_per_block must be >= 1 or unset, got {self.max_steps_per_block}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1 or unset, got {self.batch_size}")
        if self.mask_id is None:
            raise ConfigError("the sampler needs mask_id (the tokenizer's [MASK] id); set SamplerConfig.mask_id "
                              "or pass a model from load_model_for_inference")


@dataclass
class GenerationResult:
    """One generated sequence.

    ``token_ids`` are all generated positions, through the block in which
    generation stopped (tokens after EOS in that block included), aligned with
    ``step_map``: exactly what :func:`llada_cpt.rl.trajectory.build_trajectory_inputs`
    takes as ``gen_ids`` / ``step_map`` with ``prompt_ids``.  To batch rollouts,
    pad with ``-1`` steps up to ``len(prompt_ids) + max_new_tokens`` at most:
    positions past a sequence's budget were not part of its input (not even as
    ``[MASK]``), so padding that reaches into its last block would add keys the
    sampler never showed the model.  Padding after a block that ended with EOS
    is harmless (later blocks are invisible to earlier ones).
    """

    prompt_ids: List[int]
    token_ids: List[int]
    step_map: List[int]
    finish_reason: str  # eos | length | context
    num_steps: int  # decoding forwards in which this sequence committed tokens
    eos_id: Optional[int] = None
    text: Optional[str] = None  # decoded completion (up to EOS) when a tokenizer was given
    # log-prob of each generated token under the model when it was committed (full vocabulary, untempered)
    token_logprobs: List[float] = field(default_factory=list)

    @property
    def completion_ids(self) -> List[int]:
        """Generated ids up to (excluding) the first EOS."""
        if self.eos_id is not None and self.eos_id in self.token_ids:
            return self.token_ids[: self.token_ids.index(self.eos_id)]
        return list(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tpf(self) -> float:
        """Tokens per forward of this sequence."""
        return self.num_tokens / max(self.num_steps, 1)

    def to_dict(self) -> dict:
        return {"text": self.text, "ids": self.token_ids, "step_map": self.step_map,
                "prompt_ids": self.prompt_ids, "finish_reason": self.finish_reason,
                "stats": {"steps": self.num_steps, "tokens": self.num_tokens, "tpf": round(self.tpf, 4)}}


@dataclass
class GenerationStats:
    """Totals of one :func:`sample` (or :func:`~llada_cpt.inference.generation.generate`) call.

    ``tpf`` is tokens per forward *per sequence* (generated tokens over the sum of
    the sequences' decoding steps), the quantity the LLaDA2.0 report calls TPF;
    ``forward_passes`` counts batched model forwards.
    """

    sequences: int = 0
    generated_tokens: int = 0
    decoding_steps: int = 0
    forward_passes: int = 0
    seconds: float = 0.0

    @property
    def tpf(self) -> float:
        return self.generated_tokens / max(self.decoding_steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")

    def add(self, other: "GenerationStats") -> None:
        self.sequences += other.sequences
        self.generated_tokens += other.generated_tokens
        self.decoding_steps += other.decoding_steps
        self.forward_passes += other.forward_passes
        self.seconds += other.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "tpf": self.tpf, "tokens_per_second": self.tokens_per_second}

    def summary(self) -> str:
        return (f"{self.sequences} sequences | {self.generated_tokens} tokens | forward passes {self.forward_passes} "
                f"| TPF {self.tpf:.2f} | {self.tokens_per_second:.1f} tokens/s | {self.seconds:.2f} s")


class GenerationBatch(list):
    """``list[GenerationResult]`` (in prompt order) with the call's :class:`GenerationStats` as ``.stats``."""

    def __init__(self, results: Sequence[GenerationResult] = (), stats: Optional[GenerationStats] = None):
        super().__init__(results)
        self.stats = stats or GenerationStats()


class Denoiser(Protocol):
    """``(tokens [b, n], positions [b, n], cache, num_logits) -> logits [b, num_logits, V]`` (float, full vocab).

    ``cache`` (already planned for this forward) goes to attention; the logits are
    those of the last ``num_logits`` tokens.
    """

    device: torch.device

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, num_logits: int
    ) -> torch.Tensor: ...


# ------------------------------------------------------------------------- pure decisions


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k (ties with the k-th value kept) then nucleus (top-p) filtering over the last dim.

    Nucleus keeps the smallest most-probable set whose mass reaches ``top_p``;
    removed entries become ``-inf``.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the top one always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def propose_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A token and its confidence for every position of ``logits`` ``[..., V]``.

    Greedy (``temperature == 0``): the argmax and its softmax probability.
    Sampling: a draw from the tempered, filtered distribution and its probability there.
    """
    logits = logits.float()
    if temperature <= 0:
        conf, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
        return tokens, conf
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def select_commits(confidence: torch.Tensor, pending: torch.Tensor, threshold: float, min_tokens: int = 1,
                   commit_all: bool = False) -> torch.Tensor:
    """``[b, n]`` bool: pending positions to commit at this step.

    Every pending position with ``confidence > threshold``, and at least the
    ``min_tokens`` most confident pending ones (ties: lowest position first);
    all pending positions when ``commit_all``.
    """
    if commit_all:
        return pending.clone()
    conf = confidence.float().masked_fill(~pending, -1.0)
    above = pending & (conf > threshold)
    order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return above | (pending & (rank < min_tokens))


def token_budget(prompt_len: int, cfg: SamplerConfig) -> int:
    """Positions a prompt may generate: ``max_new_tokens`` capped by the context."""
    end = prompt_len + cfg.max_new_tokens
    if cfg.context_length is not None:
        end = min(end, cfg.context_length)
    return max(end - prompt_len, 0)


def check_prompts(prompts: Sequence[Sequence[int]], cfg: SamplerConfig, names: Optional[Sequence[str]] = None) -> None:
    """One error naming the first prompt that leaves no room to generate, before anything is generated.

    ``names`` label the prompts in the message (default ``prompt <index>``).
    """
    for i, p in enumerate(prompts):
        name = names[i] if names is not None else f"prompt {i}"
        if cfg.context_length is not None and len(p) >= cfg.context_length:
            raise PromptTooLongError(
                f"{name} has {len(p)} tokens but the model's context is {cfg.context_length} positions "
                f"(model.max_position_embeddings); shorten the prompt to at most {cfg.context_length - 1} tokens")
        if cfg.mask_id in p:
            raise ConfigError(f"{name} contains the mask id {cfg.mask_id}; prompts must be clean text")


# ------------------------------------------------------------------------------ the loop


@dataclass
class _Batch:
    """The state of one batch in batch coordinates (rows left-padded by whole blocks, see the module docstring).

    ``[b, T]`` tensors live on the denoiser's device; ``pad``/``budget`` stay on the CPU.
    """

    prompts: List[List[int]]
    pad: torch.Tensor  # [b] left padding of each row (whole blocks)
    budget: torch.Tensor  # [b] positions each row may generate
    first_block: int  # the batch block in which every row's generation starts
    tokens: torch.Tensor  # [b, T] ids; mask_id where nothing is committed yet
    valid: torch.Tensor  # [b, T] real positions (prompt and budget, no padding)
    gen: torch.Tensor  # [b, T] positions to generate
    positions: torch.Tensor  # [b, T] RoPE positions (per row)
    blocks: torch.Tensor  # [T] block of each column
    end: torch.Tensor  # [b] exclusive end of each row
    committed: torch.Tensor  # [b, T] generated positions already committed
    step_map: torch.Tensor  # [b, T] decoding step that committed each position (-1: none)
    logprobs: torch.Tensor  # [b, T] log-prob of each committed token
    steps_done: torch.Tensor  # [b] decoding forwards in which each row committed tokens
    rows: torch.Tensor  # rows still generating (indices into the batch)
    cache: KVCache
    reason: List[str]  # finish reason of each row
    forwards: int = 0

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


def _setup_batch(prompts: Sequence[Sequence[int]], cfg: SamplerConfig, dev: torch.device) -> _Batch:
    """Lay the prompts out in batch coordinates, every budget position masked, nothing cached."""
    B = cfg.block_size
    b = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    budget = torch.tensor([token_budget(len(p), cfg) for p in prompts], dtype=torch.long)
    first = plen // B  # each row's first generated block (its own coordinates)
    K = int(first.max())
    pad = (K - first) * B  # left padding by whole blocks: row i's block first[i] is batch block K
    end = pad + plen + budget  # exclusive end of row i in batch coordinates
    T = int(end.max())
    col = torch.arange(T)
    valid = (col >= pad[:, None]) & (col < end[:, None])
    gen = (col >= (pad + plen)[:, None]) & valid
    tokens = torch.full((b, T), cfg.mask_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, int(pad[i]): int(pad[i]) + len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    positions = (col - pad[:, None]).clamp(min=0)
    blocks = col // B
    tokens, valid, gen, positions, blocks, end = (t.to(dev) for t in (tokens, valid, gen, positions, blocks, end))
    return _Batch(prompts=[list(p) for p in prompts], pad=pad, budget=budget, first_block=K, tokens=tokens,
                  valid=valid, gen=gen, positions=positions, blocks=blocks, end=end,
                  committed=torch.zeros_like(gen), step_map=torch.full((b, T), -1, dtype=torch.long, device=dev),
                  logprobs=torch.zeros((b, T), dtype=torch.float32, device=dev),
                  steps_done=torch.zeros(b, dtype=torch.long, device=dev), rows=torch.arange(b, device=dev),
                  cache=KVCache(b, T if cfg.use_cache else 0, dev), reason=["length"] * b)


def _plan_forward(batch: _Batch, cfg: SamplerConfig, lo: int, hi: int, dev: torch.device) -> tuple[int, KVCache]:
    """Where this forward's input starts, and the cache (planned) it attends with, for current block ``[lo, hi)``."""
    rows = batch.rows
    if cfg.use_cache:
        start = batch.cache.length  # clean blocks not cached yet (prompt / previous block) + current block
        batch.cache.plan(batch.positions[rows, start:hi], batch.blocks[start:hi], batch.valid[rows, start:hi],
                         write=lo - start)
        return start, batch.cache
    # reference: the whole prefix, nothing kept
    step_cache = KVCache(len(rows), 0, dev)
    step_cache.plan(batch.positions[rows, :hi], batch.blocks[:hi], batch.valid[rows, :hi], write=0)
    return 0, step_cache


def _denoise_step(denoiser: Denoiser, batch: _Batch, cfg: SamplerConfig, lo: int, hi: int, commit_all: bool,
                  generator: Optional[torch.Generator]) -> Optional[int]:
    """One forward over the current block ``[lo, hi)`` of the live rows, and its commits.

    Returns the number of tokens committed, or None (no forward) when every
    live row's block is already complete.
    """
    rows = batch.rows
    pending = batch.gen[rows, lo:hi] & ~batch.committed[rows, lo:hi]
    active = pending.any(dim=1)
    if not bool(active.any()):
        return None
    start, step_cache = _plan_forward(batch, cfg, lo, hi, denoiser.device)
    logits = denoiser(batch.tokens[rows, start:hi], batch.positions[rows, start:hi], step_cache, hi - lo)
    step_cache.finish()
    batch.forwards += 1
    # the model's own distribution (all vocabulary rows, mask included), as training scores it:
    # the log-prob of each committed token is the behaviour policy's, for RL (`rl.old_logprobs=rollout`)
    full_logp = torch.log_softmax(logits.float(), dim=-1)
    logits = logits[..., : cfg.vocab_size] if cfg.vocab_size else logits
    logits = logits.float()
    logits[..., cfg.mask_id] = float("-inf")  # the mask is never a prediction
    proposal, conf = propose_tokens(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)
    commit = select_commits(conf, pending, cfg.threshold, cfg.min_tokens_per_step, commit_all=commit_all)
    batch.tokens[rows, lo:hi] = torch.where(commit, proposal, batch.tokens[rows, lo:hi])
    batch.committed[rows, lo:hi] |= commit
    batch.step_map[rows, lo:hi] = torch.where(commit, batch.steps_done[rows].unsqueeze(1),
                                              batch.step_map[rows, lo:hi])
    chosen = full_logp.gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
    batch.logprobs[rows, lo:hi] = torch.where(commit, chosen, batch.logprobs[rows, lo:hi])
    batch.steps_done[rows] += active.long()
    return int(commit.sum())


def _retire_finished(batch: _Batch, cfg: SamplerConfig, lo: int, hi: int,
                     progress: Optional[Callable[[int], None]]) -> bool:
    """After block ``[lo, hi)`` is complete for every live row: drop the rows that stop here.

    A row stops at the end of its budget or after the block in which it
    committed EOS.  Returns whether any row is still generating.
    """
    rows = batch.rows
    ended = batch.end[rows] <= hi
    eos = torch.zeros_like(ended)
    if cfg.stop_at_eos and cfg.eos_id is not None:
        eos = ((batch.tokens[rows, lo:hi] == cfg.eos_id) & batch.gen[rows, lo:hi]).any(dim=1)
    stop = ended | eos
    if bool(stop.any()):
        for r, is_eos in zip(rows[stop].tolist(), eos[stop].tolist()):
            if is_eos:
                batch.reason[r] = "eos"
            elif int(batch.budget[r]) < cfg.max_new_tokens:  # the context cut the budget
                batch.reason[r] = "context"
            if progress is not None:  # the unused budget of a stopped row counts as done
                progress(int(batch.budget[r]) - int(batch.committed[r].sum()))
        keep = (~stop).nonzero().squeeze(1)
        batch.rows = rows[keep]
        if cfg.use_cache:
            batch.cache.select(keep)
    return batch.rows.numel() > 0


def _pack_results(batch: _Batch, cfg: SamplerConfig, seconds: float
                  ) -> tuple[List[GenerationResult], GenerationStats]:
    """Each row's generated positions (through its last block) as a :class:`GenerationResult`, and the totals."""
    tokens, committed, step_map, steps_done, logprobs = (
        t.cpu() for t in (batch.tokens, batch.committed, batch.step_map, batch.steps_done, batch.logprobs))
    results = []
    for i, p in enumerate(batch.prompts):
        s = int(batch.pad[i]) + len(p)
        n = int(committed[i].sum())
        results.append(GenerationResult(
            prompt_ids=list(p), token_ids=tokens[i, s:s + n].tolist(), step_map=step_map[i, s:s + n].tolist(),
            finish_reason=batch.reason[i], num_steps=int(steps_done[i]), eos_id=cfg.eos_id,
            token_logprobs=logprobs[i, s:s + n].tolist()))
    stats = GenerationStats(sequences=len(batch.prompts), generated_tokens=int(committed.sum()),
                            decoding_steps=int(steps_done.sum()), forward_passes=batch.forwards, seconds=seconds)
    return results, stats


def _sample_batch(denoiser: Denoiser, prompts: Sequence[Sequence[int]], cfg: SamplerConfig,
                  generator: Optional[torch.Generator], progress: Optional[Callable[[int], None]]
                  ) -> tuple[List[GenerationResult], GenerationStats]:
    """Blocks left to right; inside a block, denoising steps until every live row's block is complete."""
    batch = _setup_batch(prompts, cfg, denoiser.device)
    B = cfg.block_size
    max_steps = cfg.max_steps_per_block or B
    t0 = time.perf_counter()
    for k in range(batch.first_block, math.ceil(batch.length / B)):
        lo, hi = k * B, min((k + 1) * B, batch.length)
        steps_in_block = 0
        while (n_committed := _denoise_step(denoiser, batch, cfg, lo, hi, steps_in_block + 1 >= max_steps,
                                            generator)) is not None:
            steps_in_block += 1
            if progress is not None:
                progress(n_committed)
        if not _retire_finished(batch, cfg, lo, hi, progress):
            break
    return _pack_results(batch, cfg, time.perf_counter() - t0)


def sample(denoiser: Denoiser, prompts: Sequence[Sequence[int]], cfg: SamplerConfig,
           progress: Optional[Callable[[int], None]] = None, tokenizer=None) -> GenerationBatch:
    """Generate a continuation of every prompt (token ids) with ``denoiser``; results in prompt order.

    ``progress(n)`` is called with the number of budget positions settled
    (committed tokens, and the unused budget of a stopped sequence): they sum to
    ``sum(token_budget(len(p), cfg))``.
    """
    cfg.validate()
    prompts = [list(map(int, p)) for p in prompts]
    check_prompts(prompts, cfg)
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=denoiser.device).manual_seed(cfg.seed)
    out = GenerationBatch()
    size = cfg.batch_size or max(len(prompts), 1)
    for i in range(0, len(prompts), size):
        results, stats = _sample_batch(denoiser, prompts[i:i + size], cfg, generator, progress)
        out.extend(results)
        out.stats.add(stats)
    if tokenizer is not None:
        for r in out:
            r.text = tokenizer.decode(r.completion_ids)
    return out

"""Trajectory-aware training inputs (TraceRL / DiPO): replay each decoding step's context from the step map.

The sampler generates blocks of ``B`` tokens left to right and records, for each
generated token, the global step that committed it (``step_map``, ``-1`` for
positions never generated).  At a step inside block ``k`` the model saw the
prompt and blocks ``< k`` clean (KV cache) and block ``k`` with the tokens
committed at *earlier* steps visible and every other position ``[MASK]``.  To
train on exactly that policy, each step becomes a training target with exactly
that context.

Blocks follow DESIGN section 2: ``b(pos) = pos // B`` counted from the start of
the document, which starts with the prompt, so if ``prompt_len % B != 0`` the
first generated block shares its block with the end of the prompt (the prompt
part of it is clean in ``x_t``).  In the ``[x_t ; x_0]`` layout a query in
block ``k`` of ``x_t`` sees only block ``k`` of ``x_t`` and blocks ``< k`` of
``x_0``; the views of different blocks are therefore independent and one
forward can replay one step of *every* block at once: forward ``j`` holds the
``j``-th step of each block, so a rollout needs ``max_k(steps in block k)``
forwards instead of one per step.

``max_forwards`` bounds that number: a block with more steps than forwards has
its steps split into ``max_forwards`` contiguous, near-equal runs, and each
run is trained in one forward with the context of its *first* step and the
tokens of all its steps as targets.  This is an approximation (TraceRL's
trajectory shrinkage): tokens of a later step in the run are predicted
without seeing the tokens committed at the earlier steps of the same run.
With ``max_forwards`` at least the largest per-block step count every forward
is exact.

Prompt positions are never targets.  Within ``x_t`` a block that has no step in
a forward is left clean (nothing in it is a target and no other block reads its
``x_t`` copy); never-generated positions are ``[MASK]`` everywhere in ``x_t``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import DataError

__all__ = ["TrajectoryInputs", "StepView", "build_trajectory_inputs", "step_views"]


@dataclass
class TrajectoryInputs:
    """Training inputs of one rollout; ``S = prompt_len + G``, ``F`` forwards."""

    x_t: torch.Tensor  # [F, S] long: noised half of each forward
    x_0: torch.Tensor  # [S] long: clean prompt + generation, the x_0 half of every forward
    target: torch.Tensor  # [F, S] bool: tokens predicted (and trained) in each forward
    target_step: torch.Tensor  # [F, S] long: global step that committed each target, -1 elsewhere
    context_step: torch.Tensor  # [F, num_blocks] long: step whose context block k replays, -1 if idle
    prompt_len: int
    block_size: int
    mask_id: int
    exact: bool  # False when some forward merges several steps of one block (max_forwards reached)

    @property
    def num_forwards(self) -> int:
        return self.x_t.shape[0]

    @property
    def seq_len(self) -> int:
        return self.x_0.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.context_step.shape[1]

    def block_of(self) -> torch.Tensor:
        """Block index of every position (document-relative, DESIGN section 2)."""
        return torch.arange(self.seq_len, device=self.x_0.device) // self.block_size


def _validate(
    prompt_ids: torch.Tensor,
    gen_ids: torch.Tensor,
    step_map: torch.Tensor,
    block_size: int,
    mask_id: int,
    max_forwards: Optional[int],
) -> None:
    """Check the sampler contract; one DataError naming the broken rule."""
    if prompt_ids.dim() != 1 or gen_ids.dim() != 1 or step_map.dim() != 1:
        raise DataError("prompt_ids, gen_ids and step_map must be 1-D (one rollout); call once per rollout")
    if gen_ids.shape != step_map.shape:
        raise DataError(
            f"step_map has {step_map.numel()} entries but the rollout generated {gen_ids.numel()} positions; "
            "the sampler must return one step per generated position (-1 where never generated)"
        )
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    if max_forwards is not None and max_forwards < 1:
        raise DataError(f"max_forwards must be >= 1 or None, got {max_forwards}")
    if (step_map < -1).any():
        raise DataError("step_map entries must be >= 0 (commit step) or -1 (never generated)")
    done = step_map >= 0
    if (gen_ids[done] == mask_id).any() or (prompt_ids == mask_id).any():
        raise DataError(f"a prompt or committed token equals mask_id={mask_id}; the step replay would be ambiguous")
    if not done.any():
        return
    P = prompt_ids.numel()
    blk = (P + torch.arange(gen_ids.numel(), device=gen_ids.device)) // block_size
    last = int(blk[done].max())
    if ((~done) & (blk < last)).any():
        raise DataError(
            "step_map has never-generated (-1) positions before the last generated block; the sampler must "
            "finish every block before moving on (only the block that ends generation may stay partly masked)"
        )
    gen_blk, steps = blk[done], step_map[done]
    nb = last + 1
    lo = torch.full((nb,), torch.iinfo(torch.long).max, dtype=torch.long, device=steps.device)
    hi = torch.full((nb,), -1, dtype=torch.long, device=steps.device)
    lo = lo.scatter_reduce(0, gen_blk, steps, "amin")
    hi = hi.scatter_reduce(0, gen_blk, steps, "amax")
    used = hi >= 0
    if (hi[used][:-1] > lo[used][1:]).any():
        raise DataError(
            f"step_map is not block-sequential for block_size={block_size} and prompt_len={P}: a block has a "
            "step later than a step of the next block.  Sampler and trainer must agree on block boundaries "
            "(blocks are counted from the start of the prompt, DESIGN section 2) and on the block size"
        )


def build_trajectory_inputs(
    prompt_ids: torch.Tensor,
    gen_ids: torch.Tensor,
    step_map: torch.Tensor,
    block_size: int,
    mask_id: int,
    max_forwards: Optional[int] = None,
) -> TrajectoryInputs:
    """Replay the step map of one rollout as at most ``max_forwards`` forwards (see module docstring)."""
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    gen_ids = torch.as_tensor(gen_ids, dtype=torch.long, device=prompt_ids.device)
    step_map = torch.as_tensor(step_map, dtype=torch.long, device=prompt_ids.device)
    _validate(prompt_ids, gen_ids, step_map, block_size, mask_id, max_forwards)
    dev = prompt_ids.device
    P, G = prompt_ids.numel(), gen_ids.numel()
    S = P + G
    x0 = torch.cat([prompt_ids, gen_ids])
    num_blocks = (S + block_size - 1) // block_size
    done = step_map >= 0
    gen_pos = torch.nonzero(done).squeeze(1)
    k = (P + gen_pos) // block_size
    s = step_map[gen_pos]

    # dense rank of each token's step within its block, then split each block's steps into runs
    stride = int(s.max()) + 1 if s.numel() else 1
    uniq, inverse = torch.unique(k * stride + s, return_inverse=True)
    steps_per_block = torch.bincount(uniq // stride, minlength=num_blocks)
    first = torch.cumsum(steps_per_block, 0) - steps_per_block
    rank = inverse - first[k]
    n_k = steps_per_block[k]
    runs_k = n_k.clamp(max=max_forwards) if max_forwards is not None else n_k
    chunk = rank * runs_k // n_k  # contiguous near-equal runs of steps
    F = int(runs_k.max()) if runs_k.numel() else 0

    # c: forward in which a position becomes a target; visible in forward f iff c < f
    c = torch.full((S,), F, dtype=torch.long, device=dev)  # never generated: masked in every forward
    c[:P] = -1  # prompt: always clean
    c[P + gen_pos] = chunk
    fwd = torch.arange(F, device=dev).unsqueeze(1)
    x_t = torch.where(c.unsqueeze(0) < fwd, x0.unsqueeze(0), torch.full_like(x0, mask_id).unsqueeze(0))
    target = c.unsqueeze(0) == fwd
    full_steps = torch.full((S,), -1, dtype=torch.long, device=dev)
    full_steps[P + gen_pos] = s
    target_step = torch.where(target, full_steps.unsqueeze(0), torch.full_like(full_steps, -1).unsqueeze(0))

    context_step = torch.full((F, num_blocks), torch.iinfo(torch.long).max, dtype=torch.long, device=dev)
    context_step.view(-1).scatter_reduce_(0, chunk * num_blocks + k, s, "amin")
    context_step[context_step == torch.iinfo(torch.long).max] = -1
    exact = bool((runs_k == n_k).all())
    return TrajectoryInputs(x_t, x0, target, target_step, context_step, P, block_size, mask_id, exact)


@dataclass
class StepView:
    """What the queries of one block saw in one forward, reconstructed from the model inputs alone."""

    forward: int
    block: int
    context_step: int
    steps: list[int]  # global steps whose tokens are this view's targets (several if merged)
    visible: torch.Tensor  # [S] bool: positions seen as clean tokens (x_0 of blocks < k, unmasked x_t of block k)
    masked: torch.Tensor  # [S] bool: positions seen as [MASK] (in block k)
    tokens: torch.Tensor  # [S] long: token seen at each position (mask_id where masked, -1 in later blocks)
    targets: torch.Tensor  # [S] bool


def step_views(inputs: TrajectoryInputs) -> list[StepView]:
    """Per (forward, block) view implied by the ``[x_t ; x_0]`` attention rule; used to check the replay."""
    blk = inputs.block_of()
    views = []
    for f in range(inputs.num_forwards):
        for k in torch.unique(blk[inputs.target[f]]).tolist():
            earlier, same = blk < k, blk == k
            in_mask = inputs.x_t[f] == inputs.mask_id
            tokens = torch.where(earlier, inputs.x_0, torch.where(same, inputs.x_t[f], torch.full_like(inputs.x_0, -1)))
            tgt = inputs.target[f] & same
            views.append(StepView(
                forward=f,
                block=k,
                context_step=int(inputs.context_step[f, k]),
                steps=sorted(set(inputs.target_step[f][tgt].tolist())),
                visible=earlier | (same & ~in_mask),
                masked=same & in_mask,
                tokens=tokens,
                targets=tgt,
            ))
    return views

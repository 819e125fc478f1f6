"""Trajectory-aware inputs reproduce, step by step, what the sampler's model saw (TraceRL replay)."""
import random

import pytest
import torch

from llada_cpt.diffusion.masks import block_diffusion_mask
from llada_cpt.errors import DataError
from llada_cpt.rl.trajectory import build_trajectory_inputs, step_views

MASK = 1000
UNSEEN = -1


def random_rollout(rng: random.Random):
    """A prompt, generated ids and a step map obeying the sampler contract.

    Blocks (counted from the prompt start) are decoded left to right; each step
    commits >= 1 token of the current block; steps are global, may skip values,
    and a block may start at the step that ended the previous one.  Generation can
    stop inside a block (EOS): the rest of that block and everything after stays -1.
    """
    B = rng.choice([1, 2, 3, 4, 8])
    P = rng.randint(0, 9)
    G = rng.randint(1, 40)
    prompt = [rng.randrange(0, 500) for _ in range(P)]
    gen = [rng.randrange(500, 999) for _ in range(G)]
    steps = [-1] * G
    step = rng.randint(0, 3)
    stop_block = rng.choice([None, rng.randint(0, (P + G - 1) // B)])
    for k in range(P // B, (P + G - 1) // B + 1):
        pos = [g for g in range(G) if (P + g) // B == k]
        if stop_block is not None and k > stop_block:
            break
        if stop_block is not None and k == stop_block and rng.random() < 0.7:
            pos = rng.sample(pos, rng.randint(1, len(pos)))  # EOS: some positions never committed
        rng.shuffle(pos)
        i = 0
        if rng.random() < 0.2:
            step -= 1  # share the previous block's last step (non-decreasing across blocks)
        while i < len(pos):
            step += 1 + rng.choice([0, 0, 0, 1, 3])
            n = rng.randint(1, len(pos) - i)
            for g in pos[i:i + n]:
                steps[g] = step
            i += n
    return torch.tensor(prompt, dtype=torch.long), torch.tensor(gen), torch.tensor(steps), B


def replay(prompt, gen, steps, B):
    """Independent oracle: simulate the sampler.  Returns {(block, step): (tokens_seen, targets)}.

    ``tokens_seen[pos]`` is the token the block's queries see at ``pos`` (MASK if masked,
    UNSEEN for later blocks); ``targets`` are the positions committed at that step.
    """
    P, G = len(prompt), len(gen)
    S = P + G
    state = prompt.tolist() + [MASK] * G  # the sequence as the sampler holds it
    out = {}
    for k in range(S // B + 1):
        block = [p for p in range(S) if p // B == k]
        block_steps = sorted({int(steps[p - P]) for p in block if p >= P and steps[p - P] >= 0})
        for s in block_steps:
            seen = [state[p] if p // B <= k else UNSEEN for p in range(S)]
            targets = {p for p in block if p >= P and int(steps[p - P]) == s}
            out[(k, s)] = (seen, targets)
            for p in targets:
                state[p] = int(gen[p - P])
    return out


def context_from_mask(ti, f, q, bdlm):
    """Tokens that query ``q`` of forward ``f``'s x_t half may read, per the binding BDLM mask ``bdlm``."""
    S = ti.seq_len
    allowed = bdlm[q]
    seen = [UNSEEN] * S
    for j in range(S):
        if allowed[j]:
            seen[j] = int(ti.x_t[f, j])
        if allowed[S + j]:
            assert seen[j] == UNSEEN, "a position is visible through both halves"
            seen[j] = int(ti.x_0[j])
    return seen


def view_tokens(v):
    return [int(t) for t in v.tokens]


@pytest.mark.parametrize("seed", range(40))
def test_exact_replay_matches_every_step(seed):
    rng = random.Random(seed)
    prompt, gen, steps, B = random_rollout(rng)
    ti = build_trajectory_inputs(prompt, gen, steps, B, MASK)
    oracle = replay(prompt, gen, steps, B)
    assert ti.exact
    assert torch.equal(ti.x_0, torch.cat([prompt, gen]))
    per_block = {}
    for k, s in oracle:
        per_block.setdefault(k, []).append(s)
    assert ti.num_forwards == max((len(v) for v in per_block.values()), default=0)

    bdlm = block_diffusion_mask(torch.zeros(ti.seq_len, dtype=torch.long), B)
    views = step_views(ti)
    assert sorted((v.block, v.steps[0]) for v in views) == sorted(oracle)
    for v in views:
        assert len(v.steps) == 1 and v.context_step == v.steps[0]
        s = v.steps[0]
        seen, targets = oracle[(v.block, s)]
        assert v.forward == sorted(per_block[v.block]).index(s)  # forward j holds the j-th step of each block
        assert view_tokens(v) == seen
        assert set(torch.nonzero(v.targets).flatten().tolist()) == targets
        assert torch.equal(v.masked, torch.tensor([t == MASK for t in seen]))
        assert torch.equal(v.visible, torch.tensor([t not in (MASK, UNSEEN) for t in seen]))
        for q in targets:  # what the attention mask lets the target query read is the same context
            assert context_from_mask(ti, v.forward, q, bdlm) == seen
            assert int(ti.target_step[v.forward, q]) == s


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("max_forwards", [1, 2, 3])
def test_bounded_forwards_merge_consecutive_steps(seed, max_forwards):
    rng = random.Random(1000 + seed)
    prompt, gen, steps, B = random_rollout(rng)
    ti = build_trajectory_inputs(prompt, gen, steps, B, MASK, max_forwards=max_forwards)
    oracle = replay(prompt, gen, steps, B)
    P = len(prompt)
    assert ti.num_forwards <= max_forwards
    per_block = {}
    for k, s in oracle:
        per_block.setdefault(k, []).append(s)
    assert ti.exact == all(len(v) <= max_forwards for v in per_block.values())

    bdlm = block_diffusion_mask(torch.zeros(ti.seq_len, dtype=torch.long), B)
    runs = {}
    for v in step_views(ti):
        ordered = sorted(per_block[v.block])
        i = ordered.index(v.steps[0])
        assert v.steps == ordered[i:i + len(v.steps)]  # a contiguous run of the block's steps
        assert v.context_step == v.steps[0]
        seen, _ = oracle[(v.block, v.steps[0])]
        assert view_tokens(v) == seen  # the context of the run's first step
        union = set().union(*(oracle[(v.block, s)][1] for s in v.steps))
        assert set(torch.nonzero(v.targets).flatten().tolist()) == union
        for q in union:
            assert context_from_mask(ti, v.forward, q, bdlm) == seen
        runs.setdefault(v.block, []).append(len(v.steps))
    for k, sizes in runs.items():
        assert sum(sizes) == len(per_block[k]) and max(sizes) - min(sizes) <= 1
        assert len(sizes) == min(len(per_block[k]), max_forwards)

    # every generated token is a target exactly once; prompt and never-generated positions never are
    count = ti.target.sum(0)
    generated = torch.cat([torch.zeros(P, dtype=torch.bool), steps >= 0])
    assert torch.equal(count, generated.long())


def test_never_generated_positions_stay_masked_and_untrained():
    prompt = torch.tensor([1, 2, 3])
    gen = torch.tensor([10, 11, 12, 13, 14, 15])
    steps = torch.tensor([0, 0, 1, 2, -1, -1])  # B=4: blocks [1 2 3 10] [11 12 13 14] [15]
    ti = build_trajectory_inputs(prompt, gen, steps, 4, MASK)
    assert (ti.x_t[:, 7:] == MASK).all() and not ti.target[:, 7:].any()
    assert not ti.target[:, :3].any() and (ti.x_t[:, :3] == prompt).all()


def test_no_generated_token_gives_no_forward():
    ti = build_trajectory_inputs(torch.tensor([1, 2]), torch.tensor([5, 6]), torch.tensor([-1, -1]), 2, MASK)
    assert ti.num_forwards == 0 and ti.x_t.shape == (0, 4) and ti.exact


def test_block_size_one_is_teacher_forcing():
    gen = torch.arange(10, 16)
    ti = build_trajectory_inputs(torch.tensor([1, 2]), gen, torch.arange(6), 1, MASK)
    assert ti.num_forwards == 1
    assert torch.equal(ti.target[0], torch.tensor([False, False] + [True] * 6))


@pytest.mark.parametrize(
    "steps, msg",
    [
        ([0, 1, 2], "one step per generated position"),
        ([0, -1, 1, 1], "before the last generated block"),
        ([2, 2, 1, 1], "not block-sequential"),
        ([0, -2, 1, 1], ">= 0"),
    ],
)
def test_contract_violations_are_reported(steps, msg):
    with pytest.raises(DataError, match=msg):
        build_trajectory_inputs(torch.tensor([1, 2]), torch.tensor([5, 6, 7, 8]), torch.tensor(steps), 2, MASK)


def test_bad_arguments_are_reported():
    with pytest.raises(DataError, match="mask_id"):
        build_trajectory_inputs(torch.tensor([1, MASK]), torch.tensor([5, 6]), torch.tensor([0, 0]), 2, MASK)
    with pytest.raises(DataError, match="max_forwards"):
        build_trajectory_inputs(torch.tensor([1, 2]), torch.tensor([5, 6]), torch.tensor([0, 0]), 2, MASK, 0)

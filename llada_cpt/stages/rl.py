"""Stage ``rl`` (``llada-cpt rl``): trajectory-aware policy optimisation (TraceRL / GRPO, DAPO sampling).

One optimizer step:

1. **Rollouts** with our own block-diffusion sampler on the training weights
   (no copy to another engine): ``rl.group_size`` responses per prompt, the
   step map recorded.  With an external engine (vLLM / LMDeploy / SGLang) the
   weights would have to be pushed to it after every update and the engine
   would have to return the step map; here rollout and training share them.
2. **Rewards** per rollout (math verifier on the final ``\\boxed{}``, optional
   format and speed terms, each logged) and **dynamic sampling**: groups whose
   accuracy is 0 or 1 (``rl.dynamic_sampling=accuracy``, DAPO) or whose rewards
   are all equal (``reward_std``) are dropped and more prompts are drawn, up to
   ``rl.max_oversample`` times the batch; a batch that cannot be filled is
   logged and skipped on every rank (no update), never a crash.
3. **Advantages**: z-score of the rewards within each group.
4. **Trajectory-aware inputs** (TraceRL): every rollout is replayed from its
   step map as ``[x_t ; x_0]`` rows in which the tokens committed at a step are
   predicted from exactly the context the sampler had at that step
   (:func:`llada_cpt.rl.trajectory.build_trajectory_inputs`; steps of different
   blocks share a row, ``rl.max_forwards`` bounds the rows per rollout).
5. **Old log-probs** recomputed by a forward pass of the current weights before
   the update (``rl.old_logprobs=recompute``: the first update's ratio is exactly
   1) or taken from the sampler at the step that committed each token
   (``rollout``: no extra pass; equal to the recomputed ones up to float
   round-off when ``rl.max_forwards`` does not merge steps); optional reference
   log-probs from a frozen copy of the starting checkpoint for the k3 KL.
6. **PPO-clip** per token (``eps_low`` / ``eps_high``), a mean over all target
   tokens of the global batch (Megatron's per-token normalisation, so it does
   not depend on the DP / micro-batch split).

The block size of the rollouts must equal the training block size of the run
(``diffusion.block_schedule``): a mismatch trains the model on contexts it
never saw at rollout, a known silent failure, so it is a config error here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from ..config.schema import Config
from ..data.tokenizer import resolve_tokenizer
from ..diffusion.cap import token_entropy
from ..diffusion.inputs import DiffusionBatch
from ..diffusion.layout import AttentionLayout
from ..diffusion.seeded import sample_seed
from ..errors import ConfigError, DataError
from ..parallel.cp_batch import full_token_values
from ..rl import (
    DynamicSamplingConfig,
    PPOConfig,
    RewardConfig,
    RewardFunction,
    build_trajectory_inputs,
    dynamic_sample,
    group_advantages,
    ppo_loss,
)
from ..training.distributed import all_reduce_host
from ..training.loop import Run, StepData
from ..training.reference import build_reference
from ..training.stage import Stage
from ..training.step import StepLoss, StepResult, forward_backward
from .common import bundled_path, init_or_none, say

__all__ = ["RLBatch", "RLStage", "load_questions", "main"]

PPO_SUMS = ("pg_loss", "kl", "entropy", "clip_frac", "ratio")


@dataclass
class RLBatch(DiffusionBatch):
    """``[x_t ; x_0]`` trajectory rows plus the per-token PPO inputs (``[b, 2L]``, x_t half used)."""

    token_fields = DiffusionBatch.token_fields + ("target", "advantages", "old_logp", "ref_logp")

    target: torch.Tensor = None  # bool: tokens trained in this row
    advantages: torch.Tensor = None  # float: the rollout's group-relative advantage on its targets
    old_logp: torch.Tensor = None
    ref_logp: torch.Tensor = None


@dataclass
class Group:
    """G rollouts of one prompt with their rewards."""

    prompt_ids: List[int]
    answer: str
    results: list
    rewards: torch.Tensor  # [G] total reward
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)


def load_questions(paths: Sequence[str]) -> List[dict]:
    """``{question, ground_truth_answer}`` JSONL; bad lines are reported with ``file:line``."""
    from ..data.records import LineReport, iter_jsonl

    bad = LineReport()
    out = []
    for where, rec in iter_jsonl(list(paths), bad):
        q, a = rec.get("question"), rec.get("ground_truth_answer")
        if not isinstance(q, str) or not q.strip():
            bad.add(where, "missing or empty `question`", "missing field")
            continue
        if a is None or (isinstance(a, str) and not a.strip()):
            bad.add(where, "missing or empty `ground_truth_answer`", "missing field")
            continue
        out.append({"question": q, "answer": str(a)})
    bad.check(len(out), "RL questions",
              "give JSONL lines of the form {\"question\": ..., \"ground_truth_answer\": ...}")
    return out


def _entropy(logits: torch.Tensor, trained: bool) -> torch.Tensor:
    """Per-token entropy from vocab-parallel logits ``[b, S, V/tp]``; differentiable (its backward needs no
    communication, :mod:`llada_cpt.diffusion.cap`) when ``trained`` (``rl.entropy_coef != 0``), else logged only."""
    group = parallel_state.get_tensor_model_parallel_group()
    group = group if dist.get_world_size(group) > 1 else None
    if trained:
        return token_entropy(logits.float(), group)
    with torch.no_grad():
        return token_entropy(logits.detach().float(), group)


def _logp(batch: RLBatch, logits: torch.Tensor) -> torch.Tensor:
    """Per-token log-prob of the label (after :func:`_entropy`: the cross entropy works in place on fp32)."""
    return -vocab_parallel_cross_entropy(logits.float(), batch.labels)


def _old_logp_loss_func(batch: RLBatch, logits: torch.Tensor):
    """Log-probs of every token of the full micro-batch ``[b, S]`` (gathered over context-parallel ranks), so
    that the training pass can split them like the other per-token fields."""
    logp = _logp(batch, logits).detach()
    zero = torch.zeros(3, dtype=torch.float64, device=logp.device)
    full = full_token_values(logp, batch.layout, parallel_state.get_context_parallel_group())
    return logp.sum() * 0.0, torch.zeros((), dtype=torch.int, device=logp.device), {"loss_terms": zero, "logp": full}


LOGPROBS = StepLoss(make=lambda batch: partial(_old_logp_loss_func, batch), logits=True)


def _ppo_loss_func(batch: RLBatch, cfg: PPOConfig, logits: torch.Tensor):
    entropy = _entropy(logits, trained=bool(cfg.entropy_coef) and torch.is_grad_enabled())
    logp = _logp(batch, logits)
    ref = batch.ref_logp if cfg.kl_coef else None
    terms = ppo_loss(logp, batch.old_logp, batch.advantages, batch.target, cfg, ref_logp=ref, entropy=entropy)
    count = terms.count.to(torch.int)
    report = torch.stack([terms.loss_sum.detach().double(), terms.count.double(), terms.count.double()])
    sums = torch.stack([terms.pg_sum, terms.kl_sum, terms.entropy_sum, terms.clipped_sum, terms.ratio_sum]).double()
    return terms.loss_sum, count, {"loss_terms": report, "metric_sums": sums}


class RLStage(Stage):
    """Rollouts, rewards and trajectory rows on this DP rank; PPO on the shared loop."""

    name = "rl"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        r = cfg.rl
        if r.old_logprobs not in ("recompute", "rollout"):
            raise ConfigError(f"rl.old_logprobs must be recompute or rollout, got `{r.old_logprobs}`")
        self.ppo = PPOConfig(eps_low=r.eps_low, eps_high=r.eps_high, kl_coef=r.kl_coef, entropy_coef=r.entropy_coef)
        self.reward = RewardFunction(RewardConfig(correctness_weight=r.correctness_weight,
                                                  format_weight=r.format_weight, speed=r.speed_reward))
        self.loss = StepLoss(make=lambda batch: partial(_ppo_loss_func, batch, self.ppo), logits=True,
                             metric_names=PPO_SUMS, finalize=self._finalize)
        self.cursor = 0  # global prompt position (same on every rank)
        self.reference = None
        self.rollout_metrics: Dict[str, float] = {}
        self._count = 0.0

    # ---------------------------------------------------------------- setup

    def prepare(self, cfg: Config) -> tuple[int, int]:
        self.init = init_or_none(cfg)
        self.tokenizer = resolve_tokenizer(cfg.data, self.init.section("data") if self.init else None)
        paths = cfg.rl.data or [bundled_path("arithmetic_rl.jsonl")]
        rows = load_questions(paths)
        n_valid = max(1, len(rows) // 20) if len(rows) > 1 else 0
        self.valid, self.train = rows[:n_valid], rows[n_valid:] or rows
        say(f"rl: {len(self.train)} training and {len(self.valid)} validation questions from {', '.join(paths)}")
        if self.tokenizer.eod_id is None:
            raise ConfigError("the tokenizer has no EOS/EOD token; the sampler needs one to stop")
        return self.tokenizer.vocab_size, self.tokenizer.mask_id

    def _prompt_ids(self, question: str) -> List[int]:
        r = self.cfg.rl
        text = r.prompt_template.format(question=question)
        from ..data.chat import generation_prompt_ids

        return generation_prompt_ids([{"role": "user", "content": text}], self.tokenizer, r.chat_template)

    def _sampler_config(self, run: Run, seed: int, greedy: bool = False):
        from ..inference.sampler import SamplerConfig

        r = self.cfg.rl
        return SamplerConfig(block_size=r.block_size, threshold=r.threshold, max_new_tokens=r.max_new_tokens,
                             max_steps_per_block=r.max_steps_per_block, temperature=0.0 if greedy else r.temperature,
                             top_p=r.top_p, seed=seed, mask_id=run.mask_id, eos_id=self.tokenizer.eod_id,
                             vocab_size=self.tokenizer.vocab_size, context_length=self.cfg.data.seq_length)

    def _check_block_size(self, block_size: int) -> None:
        if block_size != self.cfg.rl.block_size:
            raise ConfigError(
                f"the training block size {block_size} (diffusion.block_schedule) differs from the rollout block "
                f"size rl.block_size={self.cfg.rl.block_size}; trajectories would be trained on contexts the sampler "
                f"never saw. Set diffusion.block_schedule=[[{self.cfg.rl.block_size}, 1]] or change rl.block_size")

    # ------------------------------------------------------------- rollouts

    def _draw(self, run: Run, counter: list, n: int) -> List[Group]:
        """``n`` prompts of this rank's stream, G rollouts each, with rewards."""
        from ..inference.generation import generate

        r = self.cfg.rl
        picks = []
        for _ in range(n):
            pos = self.cursor + counter[0] * run.dp_size + run.dp_rank
            counter[0] += 1
            picks.append(self.train[pos % len(self.train)])
        prompts = [self._prompt_ids(p["question"]) for p in picks]
        seed = sample_seed(self.cfg.train.seed, run.iteration * 1_000_003 + counter[0] * run.dp_size + run.dp_rank,
                           "rollout")
        results = generate(run.model_chunks, prompts, self._sampler_config(run, seed % (2**31)),
                           tokenizer=self.tokenizer, samples_per_prompt=r.group_size)
        self._rollout_stats.append(results.stats)
        texts = [res.text or "" for res in results]
        answers = [p["answer"] for p in picks for _ in range(r.group_size)]
        terms = self.reward.batch(texts, answers, [res.step_map for res in results], r.block_size)
        groups = []
        for i, p in enumerate(picks):
            sl = slice(i * r.group_size, (i + 1) * r.group_size)
            groups.append(Group(prompts[i], p["answer"], list(results[sl]), terms["total"][sl],
                                {k: v[sl] for k, v in terms.items()}))
        return groups

    def _rollouts(self, run: Run) -> tuple[List[Group], Optional[str], dict]:
        r = self.cfg.rl
        if r.groups_per_step % run.dp_size:
            raise ConfigError(f"rl.groups_per_step={r.groups_per_step} must be divisible by the data-parallel size "
                              f"{run.dp_size}")
        on = r.dynamic_sampling != "none"
        ds = DynamicSamplingConfig(num_groups=r.groups_per_step // run.dp_size, max_oversample=r.max_oversample,
                                   enabled=on, criterion=r.dynamic_sampling if on else "accuracy")
        counter = [0]
        self._rollout_stats = []
        result = dynamic_sample(lambda n: self._draw(run, counter, n), ds, rewards_of=lambda g: g.rewards,
                                correct_of=lambda g: g.terms["correctness"])
        # every rank moves the shared cursor by the largest number of prompts any rank drew
        stats = torch.tensor([counter[0], float(result.skip), result.stats.drawn, result.stats.kept,
                              result.stats.dropped], dtype=torch.float64)
        # the TP / CP ranks of a replica drew the same rollouts: counts are summed over data-parallel ranks
        totals = all_reduce_host(stats, group=parallel_state.get_data_parallel_group())
        stats = all_reduce_host(stats, dist.ReduceOp.MAX)
        self.cursor += int(stats[0]) * run.dp_size
        info = {"groups_drawn": float(totals[2]), "groups_kept": float(totals[3]), "groups_dropped": float(totals[4])}
        skip = result.reason if result.skip else ("another data-parallel rank could not fill its batch"
                                                   if stats[1] > 0 else None)
        return result.groups, skip, info

    def _rollout_metrics(self, groups: List[Group], info: dict) -> Dict[str, float]:
        """Reward / accuracy / length / TPF of the kept rollouts, summed over DP ranks."""
        keys = ("total", "correctness", "format", "speed")
        vals = torch.zeros(len(keys) + 5, dtype=torch.float64)
        for g in groups:
            for i, k in enumerate(keys):
                vals[i] += float(g.terms[k].sum())
            vals[len(keys)] += float((g.terms["total"] ** 2).sum())
            vals[len(keys) + 1] += sum(len(res.completion_ids) for res in g.results)
            vals[len(keys) + 2] += len(g.results)
        forwards = sum(s.decoding_steps for s in self._rollout_stats)  # per-sequence steps: the report's TPF
        tokens = sum(s.generated_tokens for s in self._rollout_stats)
        vals[len(keys) + 3] += tokens
        vals[len(keys) + 4] += forwards
        vals = all_reduce_host(vals, group=parallel_state.get_data_parallel_group())
        n = max(float(vals[len(keys) + 2]), 1.0)
        mean = float(vals[0]) / n
        out = {"reward_mean": mean, "reward_std": math.sqrt(max(float(vals[len(keys)]) / n - mean ** 2, 0.0)),
               "accuracy": float(vals[1]) / n, "format_reward": float(vals[2]) / n, "speed_reward": float(vals[3]) / n,
               "response_length": float(vals[len(keys) + 1]) / n,
               "rollout_tpf": float(vals[len(keys) + 3]) / max(float(vals[len(keys) + 4]), 1.0)}
        return {**out, **info}

    # ------------------------------------------------------- training rows

    def _rows(self, groups: List[Group], block_size: int, mask_id: int) -> List[dict]:
        r = self.cfg.rl
        rows = []
        adv = group_advantages(torch.stack([g.rewards for g in groups])) if groups else torch.zeros(0, 0)
        for gi, g in enumerate(groups):
            for ri, res in enumerate(g.results):
                if not res.token_ids:
                    continue
                traj = build_trajectory_inputs(torch.tensor(g.prompt_ids), torch.tensor(res.token_ids),
                                               torch.tensor(res.step_map), block_size, mask_id, r.max_forwards)
                # the sampler's log-prob of every token at the step that committed it (behaviour policy)
                rollout_logp = torch.cat([torch.zeros(len(g.prompt_ids)), torch.tensor(res.token_logprobs)])
                for f in range(traj.num_forwards):
                    rows.append({"x_t": traj.x_t[f], "x_0": traj.x_0, "target": traj.target[f],
                                 "advantage": float(adv[gi, ri]), "rollout_logp": rollout_logp})
        return rows

    def _batch(self, rows: List[dict], L: int, pad_id: int) -> RLBatch:
        b = self.cfg.train.micro_batch_size
        x_t = torch.full((b, L), pad_id, dtype=torch.long)
        x_0 = torch.full((b, L), pad_id, dtype=torch.long)
        doc = torch.ones((b, L), dtype=torch.long)  # padding: a document of its own
        target = torch.zeros((b, L), dtype=torch.bool)
        adv = torch.zeros((b, L))
        old = torch.zeros((b, L))
        for i, row in enumerate(rows):
            S = row["x_0"].numel()
            if S > L:
                raise DataError(f"a rollout of {S} tokens exceeds data.seq_length={L}; raise data.seq_length or "
                                "lower rl.max_new_tokens")
            x_t[i, :S], x_0[i, :S], doc[i, :S] = row["x_t"], row["x_0"], 0
            target[i, :S] = row["target"]
            adv[i, :S] = row["advantage"]
            old[i, :S] = row["rollout_logp"]
        layout = AttentionLayout(doc_ids=doc, block_size=self.cfg.rl.block_size)
        zeros = torch.zeros((b, L))
        pad2 = torch.zeros((b, L), dtype=torch.bool)
        return RLBatch(
            input_ids=torch.cat([x_t, x_0], 1), labels=torch.cat([x_0, x_0], 1),
            loss_weight=torch.cat([target.float(), zeros], 1), layout=layout, masked=target, t=torch.ones((b, L)),
            eligible=target, target=torch.cat([target, pad2], 1), advantages=torch.cat([adv, zeros], 1),
            old_logp=torch.cat([old, zeros], 1), ref_logp=torch.zeros((b, 2 * L)))

    def step_data(self, run: Run, block_size: int) -> StepData:
        self._check_block_size(block_size)
        groups, skip, info = self._rollouts(run)
        self.rollout_metrics = self._rollout_metrics(groups if not skip else [], info)
        if skip:
            return StepData([], skip_reason=f"dynamic sampling: {skip}")
        rows = self._rows(groups, block_size, run.mask_id)
        m = self.cfg.train.micro_batch_size
        L = self.cfg.data.seq_length
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eod_id
        batches = [self._batch(rows[i:i + m], L, pad) for i in range(0, max(len(rows), 1), m)]
        # every DP rank must run the same number of micro-batches (pipeline and DDP lockstep)
        n = all_reduce_host(torch.tensor([len(batches)]), dist.ReduceOp.MAX)
        batches += [self._batch([], L, pad) for _ in range(int(n) - len(batches))]
        return StepData(batches)

    # ------------------------------------------------------------- the step

    def _finalize(self, sums: Dict[str, float]) -> Dict[str, float]:
        n = max(self._count, 1.0)  # target tokens of the global batch
        return {k: v / n for k, v in sums.items()}

    def _attach_logprobs(self, run: Run, batches: List[RLBatch]) -> None:
        """Old log-probs: kept from the rollout (``rl.old_logprobs=rollout``) or recomputed now."""
        with torch.no_grad():
            if self.cfg.rl.old_logprobs == "recompute":
                res = forward_backward(run.model_chunks, batches, forward_only=True, loss_fn=LOGPROBS)
                for b, out in zip(batches, res.outputs):  # the last pipeline stage holds the loss function
                    b.old_logp = out["logp"].cpu()
            if self.ppo.kl_coef:
                if self.reference is None:
                    self.reference = build_reference(self.cfg, run, self.init.path if self.init else None)
                res = forward_backward(self.reference, batches, forward_only=True, loss_fn=LOGPROBS)
                for b, out in zip(batches, res.outputs):
                    b.ref_logp = out["logp"].cpu()

    def before_step(self, run: Run, batches: List[RLBatch], forward_only: bool) -> None:
        """Old (and reference) log-probs, and the global count of target tokens that normalises the metrics."""
        self._attach_logprobs(run, batches)
        count = torch.tensor([float(sum(int(b.target.sum()) for b in batches))], dtype=torch.float64)
        # every context-parallel rank holds the whole micro-batches: sum over data-parallel ranks only
        count = all_reduce_host(count, group=parallel_state.get_data_parallel_group())
        self._count = float(count)

    def step_loss(self, run: Run, batches: List[RLBatch]) -> StepLoss:
        return self.loss

    def after_step(self, run: Run, result: StepResult) -> StepResult:
        result.metrics.update(self.rollout_metrics)
        return result

    # ----------------------------------------------------------- validation

    def validate(self, run: Run, block_size: int) -> Dict[str, float]:
        """Greedy accuracy and TPF on the held-out questions (this rank's share, summed over DP)."""
        from ..inference.generation import generate

        picks = self.valid[run.dp_rank::run.dp_size][: max(1, self.cfg.logging.eval_iters)]
        prompts = [self._prompt_ids(p["question"]) for p in picks]
        results = generate(run.model_chunks, prompts, self._sampler_config(run, 0, greedy=True),
                           tokenizer=self.tokenizer) if prompts else []
        correct = sum(self.reward.verifier(r.text or "", p["answer"]) for r, p in zip(results, picks))
        stats = getattr(results, "stats", None)
        vals = torch.tensor([float(correct), float(len(picks)), float(stats.generated_tokens if stats else 0),
                             float(stats.decoding_steps if stats else 0)], dtype=torch.float64)
        vals = all_reduce_host(vals, group=parallel_state.get_data_parallel_group())
        return {"val_accuracy": float(vals[0]) / max(float(vals[1]), 1.0),
                "val_tpf": float(vals[2]) / max(float(vals[3]), 1.0), "val_block_size": block_size}

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state.get("cursor", 0))


def main(argv=None) -> int:
    from .entry import stage_main

    return stage_main(argv, "rl", "rl", RLStage)

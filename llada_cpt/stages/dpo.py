"""Stage ``dpo`` (``llada-cpt dpo``): DPO with the block-diffusion ELBO in place of log-likelihoods.

Data: ``{prompt, chosen, rejected}`` JSONL (:mod:`llada_cpt.data.preference`);
a pair's chosen and rejected responses are documents ``2k`` / ``2k + 1`` of one
packed sequence, so both always sit in the same micro-batch.  The block size is
resolved as in SFT (``dpo.block_size``, else the init checkpoint's final one).

Loss (report eq. 7-8): ``-log sigmoid(beta * (dB_chosen - dB_rejected))`` with
``dB = ELBO_policy - ELBO_reference``, one Monte Carlo sample per pair: the same
``t`` and mask for policy and reference, and for chosen and rejected as far as
their lengths allow (:func:`llada_cpt.diffusion.dpo.sample_pair_noise`).  The
loss is a mean over the pairs of the global batch (Megatron's per-token
normalisation with the pair count as the count), so it does not depend on the
parallel layout.  Batch sizes count packed sequences.

Reference (``dpo.reference``):

* ``model``: a frozen copy of the starting checkpoint (``train.init_from``, or
  the initial weights of a run from scratch) with the same parallel layout on
  the same ranks, no gradients, eval mode.  Each step first runs it
  forward-only over the step's micro-batches (so pipeline parallelism needs
  nothing special), then the policy pass reads its ELBOs.
* ``precomputed``: one forward pass of the starting policy over every training
  and validation pair before the first update, cached per pair and saved in the
  checkpoints (no second model in memory).  Its noise is fixed per sequence, so
  every epoch reuses the cached draw; ``model`` draws fresh noise each epoch.

Learning rate: ``dpo.lr``, else the final rate of an SFT ``init_from``
checkpoint (its scheduler replayed to its last step), else ``train.lr``.
Logged: ``loss``, implicit rewards ``chosen_reward`` / ``rejected_reward``,
``reward_margin``, ``accuracy`` (margin > 0) and the ELBOs per pair of policy
(``chosen_elbo``, ``rejected_elbo``) and reference (``ref_*``).

Context parallelism: a pair's tokens are spread over the CP ranks, so the
per-pair ELBOs are summed over the CP group (identity backward: every CP rank
back-propagates the full pair loss through its own tokens); the pair count and
the reported values come from CP rank 0 only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..checkpoint.info import CheckpointInfo
from ..config.schema import Config
from ..data.preference import collate_pairs, load_preference_dataset
from ..data.tokenizer import resolve_tokenizer
from ..diffusion.dpo import dpo_loss, elbo_from_token_loss, sample_pair_noise
from ..diffusion.inputs import DiffusionBatch, build_diffusion_batch
from ..diffusion.loss import weighted_loss_terms
from ..diffusion.seeded import noise_config, sample_seed
from ..errors import ConfigError
from ..training.distributed import device as current_device
from ..training.loop import Run, StepData
from ..training.reference import build_reference
from ..training.stage import Stage
from ..training.step import StepLoss, forward_backward
from .common import PackedSplit, collate_rows, final_lr, load_packed_split, resolve_post_training, say

__all__ = ["PairBatch", "DPOStage", "dpo_step_loss", "REFERENCE_ELBO", "main"]

DPO_SUMS = ("pairs", "chosen_reward", "rejected_reward", "reward_margin", "accuracy", "chosen_elbo",
            "rejected_elbo", "ref_chosen_elbo", "ref_rejected_elbo")


@dataclass
class PairBatch(DiffusionBatch):
    """A micro-batch of packed preference pairs."""

    sample_index: Optional[torch.Tensor] = None  # [b, L]: 2p chosen / 2p + 1 rejected of pair p, -1 elsewhere
    pair_ids: Optional[torch.Tensor] = None  # [P] pair ids across the dataset (precomputed reference cache)
    ref_elbo: Optional[torch.Tensor] = None  # [P, 2] reference (chosen, rejected) ELBOs, set before the policy pass
    num_pairs: int = 0


class _SumOverContext(torch.autograd.Function):
    """All-reduce over the CP group; the backward is the identity (each rank owns its tokens' share)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=parallel_state.get_context_parallel_group())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _pair_elbos(batch: PairBatch, token_ce: torch.Tensor) -> torch.Tensor:
    """``[P, 2]`` (chosen, rejected) ELBOs ``-sum(w * CE)`` of the micro-batch's pairs."""
    index = batch.sample_index
    local = batch.layout.local_positions
    if local is not None:  # this CP rank's positions of the sequence
        index = index[:, local.to(index.device)]
    elbo = elbo_from_token_loss(token_ce, batch.loss_weight, index, 2 * batch.num_pairs).view(-1, 2)
    if parallel_state.get_context_parallel_world_size() > 1:
        elbo = _SumOverContext.apply(elbo)
    return elbo


def _reference_loss_func(batch: PairBatch, token_ce: torch.Tensor):
    """Forward-only: report the pairs' ELBOs (``outputs[i]["elbo"]``); the loss terms are the plain ELBO's."""
    total, count = weighted_loss_terms(token_ce, batch.loss_weight, batch.num_eligible)
    report = torch.stack([total.detach().double(), count.double(), batch.masked.sum().double()])
    return total, count.to(torch.int), {"loss_terms": report, "elbo": _pair_elbos(batch, token_ce.detach())}


REFERENCE_ELBO = StepLoss(make=lambda batch: partial(_reference_loss_func, batch))
"""Per-pair ELBOs of a forward-only pass (reference model, or the precomputed cache)."""


def _dpo_loss_func(batch: PairBatch, beta: float, token_ce: torch.Tensor):
    """``(sum of pair losses, pairs, report)``; counted and reported on CP rank 0 only."""
    elbo = _pair_elbos(batch, token_ce)
    ref = batch.ref_elbo.to(elbo.device)
    loss, m = dpo_loss(elbo[:, 0], elbo[:, 1], ref[:, 0], ref[:, 1], beta, reduction="sum")
    pairs = batch.num_pairs
    lead = parallel_state.get_context_parallel_rank() == 0
    sums = torch.zeros(len(DPO_SUMS), dtype=torch.float64, device=elbo.device)
    if pairs and lead:
        means = [m["chosen_reward"], m["rejected_reward"], m["reward_margin"], m["accuracy"]]
        sums[0] = pairs
        sums[1:5] = torch.stack(means).double() * pairs
        sums[5:] = torch.cat([elbo.detach().sum(0), ref.sum(0)]).double()
    count = torch.tensor(pairs if lead else 0, dtype=torch.int)
    report = torch.stack([loss.detach().double() * lead, count.double(), batch.masked.sum().double()])
    return loss, count, {"loss_terms": report, "metric_sums": sums}


def _dpo_metrics(s: Dict[str, float]) -> Dict[str, float]:
    pairs = max(s["pairs"], 1.0)
    return {k: v / pairs for k, v in s.items() if k != "pairs"}


def dpo_step_loss(beta: float) -> StepLoss:
    """The policy pass: DPO loss per pair from the per-token CE and ``batch.ref_elbo``."""
    return StepLoss(make=lambda batch: partial(_dpo_loss_func, batch, float(beta)), metric_names=DPO_SUMS,
                    finalize=_dpo_metrics)


def _pair_offsets(sequences: Sequence[dict], start: int = 0) -> List[int]:
    """Id of the first pair of each sequence (pairs numbered through the dataset)."""
    out, n = [], start
    for s in sequences:
        out.append(n)
        n += (max(s["sample_index"]) + 1) // 2
    return out + [n]


class DPOStage(Stage):
    """Packed preference pairs; DPO on the ELBO against a frozen or precomputed reference."""

    name = "dpo"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.loss = dpo_step_loss(cfg.dpo.beta)
        self.position = 0
        self.split: Optional[PackedSplit] = None
        self.init: Optional[CheckpointInfo] = None
        self.reference: Optional[list] = None  # model chunks (dpo.reference=model)
        self.ref_cache: Optional[torch.Tensor] = None  # [train + valid pairs, 2] (dpo.reference=precomputed)
        self.pad_id = 0
        self.block = 0  # set by resolve_config, with where it and the learning rate came from
        self.block_source = self.lr_source = ""

    @property
    def precomputed(self) -> bool:
        return self.cfg.dpo.reference == "precomputed"

    # ---------------------------------------------------------------- set-up

    def _learning_rate(self, cfg: Config) -> tuple[float, str]:
        if cfg.dpo.lr is not None:
            return cfg.dpo.lr, "dpo.lr"
        if self.init is not None and self.init.stage == "sft":
            lr = final_lr(self.init)
            if lr:
                return lr, f"the final rate of the SFT checkpoint {self.init.path}"
        return cfg.train.lr, "train.lr"

    def resolve_config(self, cfg: Config) -> None:
        """Before validation: the block size and (from an SFT checkpoint) the learning rate of ``train.init_from``."""
        resolved = resolve_post_training("dpo", cfg)
        self.init, self.block, self.block_source = resolved.init, resolved.block, resolved.block_source
        lr, self.lr_source = self._learning_rate(cfg)
        cfg.train.lr, cfg.train.min_lr = lr, min(cfg.train.min_lr, lr)

    def prepare(self, cfg: Config) -> tuple[int, int]:
        if not self.block:
            self.resolve_config(cfg)
        source, lr, lr_source = self.block_source, cfg.train.lr, self.lr_source
        tok = resolve_tokenizer(cfg.data, self.init.section("data") if self.init else None)
        if self.precomputed and cfg.diffusion.reference_block_size not in (None, self.block):
            raise ConfigError("dpo.reference=precomputed caches the reference ELBOs at the training block size "
                              f"{self.block}; unset diffusion.reference_block_size or use dpo.reference=model")
        d = cfg.dpo
        self.split = load_packed_split("dpo", cfg, tok, self.block, source, load_preference_dataset, "dpo_demo.jsonl")
        self.offsets = {"train": _pair_offsets(self.split.train)}
        self.offsets["valid"] = _pair_offsets(self.split.valid, self.offsets["train"][-1])
        self.pad_id = tok.pad_id
        say(f"dpo: {self.offsets['train'][-1]} training / {self.offsets['valid'][-1] - self.offsets['train'][-1]} "
            f"validation pairs in {len(self.split.train)} / {len(self.split.valid)} sequences; beta {d.beta}; "
            f"reference {d.reference}; learning rate {lr:.3g} from {lr_source}")
        return tok.vocab_size, tok.mask_id

    # ------------------------------------------------------------------ data

    def make_batch(self, part: str, rows: Sequence[Optional[int]], keys: Sequence[int], block_size: int,
                   mask_id: int) -> PairBatch:
        """Rows of ``part`` (train / valid) with pair-shared noise seeded by ``keys``."""
        sequences = self.split.train if part == "train" else self.split.valid
        data = collate_rows(sequences, rows, self.pad_id, collate_pairs)
        noise = noise_config(self.cfg.diffusion)
        ts, ms = [], []
        for r, key in enumerate(keys):
            g = torch.Generator().manual_seed(sample_seed(self.cfg.train.seed, key, f"dpo-{part}"))
            one = slice(r, r + 1)
            t, m = sample_pair_noise(data["doc_ids"][one], data["sample_index"][one], data["eligible"][one],
                                     block_size, noise, g)
            ts.append(t)
            ms.append(m)
        batch = build_diffusion_batch(data["tokens"], data["doc_ids"], block_size, mask_id, noise=noise,
                                      eligible=data["eligible"], t=torch.cat(ts), masked=torch.cat(ms))
        offsets = self.offsets[part]
        pair_ids = [torch.arange(offsets[i], offsets[i + 1]) for i in rows if i is not None]
        return PairBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)},
                         sample_index=data["sample_index"],
                         pair_ids=torch.cat(pair_ids) if pair_ids else torch.zeros(0, dtype=torch.long),
                         num_pairs=int(data["num_pairs"]))

    def step_data(self, run: Run, block_size: int) -> StepData:
        def make(rows, positions):
            # a cached reference holds for one draw per sequence; a live one allows fresh noise per epoch
            keys = rows if self.precomputed else list(positions)
            return self.make_batch("train", rows, keys, block_size, run.mask_id)

        data = self.split.step_data(self.position, self.cfg.train.micro_batch_size, run, make)
        self.position += self.cfg.train.global_batch_size
        return data

    def _valid_batches(self, run: Run, block_size: int, iters: int) -> list[list[PairBatch]]:
        def make(rows, keys):
            return self.make_batch("valid", rows, keys, block_size, run.mask_id)

        return self.split.eval_batches(self.cfg.train.micro_batch_size, run, iters, make)

    def eval_data(self, run: Run, block_size: int) -> list[list[PairBatch]]:
        """The held-out pairs with the same noise at every evaluation; the value is their DPO loss."""
        return self._valid_batches(run, block_size, self.cfg.logging.eval_iters)

    # ------------------------------------------------------------------ step

    def _precompute(self, run: Run) -> torch.Tensor:
        """One forward pass of the starting policy over every training and validation pair."""
        if self.ref_cache is not None:
            return self.ref_cache
        if run.iteration > 0:
            raise ConfigError("the checkpoint holds no precomputed reference ELBOs (dpo.reference changed?); "
                              "resume with dpo.reference=model or start a new run")
        m = self.cfg.train.micro_batch_size
        n = len(self.split.train)
        steps = -(-n // (m * run.dp_size))
        batches = []
        for k in range(steps):
            rows = [i if i < n else None for i in PackedSplit.positions(0, k, m, run.dp_rank, run.dp_size)]
            batches.append(self.make_batch("train", rows, [i if i is not None else -1 - j for j, i in enumerate(rows)],
                                           self.block, run.mask_id))
        batches += [b for group in self._valid_batches(run, self.block, len(self.split.valid)) for b in group]
        for chunk in run.model_chunks:
            chunk.eval()
        with torch.no_grad():
            res = forward_backward(run.model_chunks, batches, forward_only=True, loss_fn=REFERENCE_ELBO)
        for chunk in run.model_chunks:
            chunk.train()
        cache = torch.zeros(self.offsets["valid"][-1], 2, dtype=torch.float32, device=current_device())
        for batch, out in zip(batches, res.outputs):
            cache[batch.pair_ids.to(cache.device)] = out["elbo"].float()
        dist.all_reduce(cache, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(cache, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        self.ref_cache = cache.cpu()
        say(f"dpo: precomputed reference ELBOs of {cache.shape[0]} pairs")
        return self.ref_cache

    def _attach_reference(self, run: Run, batches: List[PairBatch]) -> None:
        if self.precomputed:
            cache = self._precompute(run)
            for b in batches:
                b.ref_elbo = cache[b.pair_ids]
            return
        if self.reference is None:
            self.reference = build_reference(self.cfg, run, self.init.path if self.init else None)
        with torch.no_grad():
            res = forward_backward(self.reference, batches, forward_only=True, loss_fn=REFERENCE_ELBO)
        for b, out in zip(batches, res.outputs):  # last pipeline stage: the only one that computes the loss
            b.ref_elbo = out["elbo"]

    def before_step(self, run: Run, batches: List[PairBatch], forward_only: bool) -> None:
        self._attach_reference(run, batches)

    def step_loss(self, run: Run, batches: List[PairBatch]) -> StepLoss:
        return self.loss

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        state = {"position": self.position, **(self.split.state_dict() if self.split else {})}
        if self.ref_cache is not None:
            state["reference_elbos"] = self.ref_cache
        return state

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state.get("position", 0))
        if self.split is not None:
            self.split.check_state(state, "dpo")
        cache = state.get("reference_elbos")
        if self.precomputed and cache is not None:
            self.ref_cache = torch.as_tensor(cache).float().cpu()


def main(argv=None) -> int:
    from .entry import stage_main

    return stage_main(argv, "dpo", "dpo", DPOStage)

"""Stage ``sft`` (``llada-cpt sft``): supervised fine-tuning of a block-diffusion model.

Data: ``{prompt, response}`` / ``{messages}`` JSONL (:mod:`llada_cpt.data.sft`);
only response tokens (and the EOD padding to a whole block, ``sft.pad_loss``)
carry loss; each sample is padded to a multiple of the block size and packed
with document ids.  The block size is ``sft.block_size``, else the init
checkpoint's trained block size, else the last phase of
``diffusion.block_schedule``; the run then uses that one block size throughout.

Noise: ``t`` in the mask-ratio band ``[diffusion.mask_ratio_min, mask_ratio_max]``
per sequence or per block, seeded by the global sample position (independent of
the data-parallel split and of restarts).  With ``sft.complementary`` each
packed sequence is also trained with the inverse mask over its response tokens,
in the same micro-batch (rows ``i`` and ``b + i``), so ``train.micro_batch_size``
and ``global_batch_size`` count *sequences* and the model sees twice as many rows.

Loss normalisation (DESIGN section 2, dParallel's CAP):

    L = sum over rows of w * CE / N_eligible  +  lambda * sum of H over masked, correct tokens / N_correct

with both counts taken over the global batch (every row's eligible tokens; the
masked tokens whose argmax equals the target), so loss and gradients do not
depend on the micro-batch / DP / CP split and the report's lambda values carry
over.  Megatron divides the gradients once, by ``N_eligible``, after the backward
passes, so ``N_correct`` must be known before them: with CAP on, a forward-only
pass over the step's micro-batches counts the correct tokens first (one extra
forward per step) and each micro-batch weights its entropy sum by
``N_eligible / N_correct``.  Logged: ``sft_loss`` and ``cap_term`` (``L_SFT`` and
``L_conf``, without lambda), ``cap_correct`` (the fraction of masked tokens
predicted correctly) and ``cap_correct_tokens`` (``N_correct``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from ..config.schema import Config
from ..data.sft import collate_packed, load_sft_dataset
from ..data.tokenizer import resolve_tokenizer
from ..diffusion.cap import vocab_parallel_cap_confidence_terms, vocab_parallel_correct_count
from ..diffusion.inputs import DiffusionBatch
from ..diffusion.loss import weighted_loss_terms
from ..diffusion.seeded import make_batch, noise_config
from ..training.loop import Run, StepData
from ..training.stage import Stage
from ..training.step import ELBO_LOSS, StepLoss, forward_backward
from .common import PackedSplit, Resolved, collate_rows, load_packed_split, resolve_post_training, say

__all__ = ["SFTStage", "CAPLoss", "sft_loss", "band_note", "main"]

CAP_SUMS = ("sft_sum", "entropy_sum", "correct", "eligible", "masked")


def _vocab_shard():
    """``(TP group, TP rank)``: rank ``r`` holds the vocabulary slice starting at ``r * V/tp`` of the logits."""
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank()


def _cap_loss_func(batch: DiffusionBatch, entropy_weight: float, logits: torch.Tensor):
    """``(sum w*CE + entropy_weight * sum H, eligible, report)`` from vocab-parallel logits ``[b, S, V/tp]``;
    ``entropy_weight = lambda * N_eligible / N_correct`` (global counts), so that Megatron's division by
    ``N_eligible`` leaves ``lambda * sum H / N_correct``."""
    group, tp_rank = _vocab_shard()
    start = tp_rank * logits.shape[-1]
    entropy_sum, correct = vocab_parallel_cap_confidence_terms(logits, batch.labels, batch.loss_weight, group, start)
    ce = vocab_parallel_cross_entropy(logits, batch.labels)  # last: it works in place on fp32 logits
    sft_sum, count = weighted_loss_terms(ce, batch.loss_weight, batch.num_eligible)
    total = sft_sum + entropy_weight * entropy_sum
    masked = batch.masked.sum().double()
    sums = torch.stack([sft_sum.detach().double(), entropy_sum.detach().double(), correct.double(), count.double(),
                        masked])
    report = torch.stack([total.detach().double(), count.double(), masked])
    return total, count.to(torch.int), {"loss_terms": report, "metric_sums": sums}


def _cap_metrics(s: Dict[str, float]) -> Dict[str, float]:
    return {"sft_loss": s["sft_sum"] / max(s["eligible"], 1.0), "cap_term": s["entropy_sum"] / max(s["correct"], 1.0),
            "cap_correct": s["correct"] / max(s["masked"], 1.0), "cap_correct_tokens": s["correct"]}


def _correct_count_func(batch: DiffusionBatch, logits: torch.Tensor):
    """Counting pass: ``[0, eligible, masked]`` and the number of masked tokens predicted correctly."""
    group, tp_rank = _vocab_shard()
    correct = vocab_parallel_correct_count(logits, batch.labels, batch.loss_weight, group, tp_rank * logits.shape[-1])
    eligible = batch.num_eligible.double()
    report = torch.stack([torch.zeros_like(eligible), eligible, batch.masked.sum().double()])
    return logits.sum() * 0.0, eligible.to(torch.int), {"loss_terms": report, "metric_sums": correct.double()[None]}


CORRECT_COUNT = StepLoss(make=lambda batch: partial(_correct_count_func, batch), logits=True,
                         metric_names=("correct",))


@dataclass(frozen=True)
class CAPLoss:
    """ELBO + ``lam * L_conf``; the step needs the global counts first (:meth:`SFTStage.forward_backward`)."""

    lam: float

    def step_loss(self, eligible: float, correct: float) -> StepLoss:
        weight = self.lam * eligible / max(correct, 1.0)  # no correct token: the entropy sum is 0 anyway
        return StepLoss(make=lambda batch: partial(_cap_loss_func, batch, weight), logits=True,
                        metric_names=CAP_SUMS, finalize=_cap_metrics)


COMPLEMENT_WEIGHT_NOTE = 20.0  # largest complement-row weight 1/(1 - m_max) the start-up note accepts silently


def band_note(mask_ratio_min: float, mask_ratio_max: float) -> Optional[str]:
    """A start-up note when complementary rows can get very large weights, else None.

    A mask of ratio ``t`` has a complement of ratio ``1 - t``, weighted ``1/(1 - t)``: with ``m_max`` near 1
    (the CPT default band [1e-3, 1]) a few complement rows carry weights of hundreds or more: a heavy-tailed loss.
    The LLaDA2.0 report bounds the band in SFT for this reason (the shipped tiny_sft recipe: [0.05, 0.95]).
    """
    if 1.0 - mask_ratio_max > 0 and 1.0 / (1.0 - mask_ratio_max) <= COMPLEMENT_WEIGHT_NOTE:
        return None
    bound = "unbounded" if mask_ratio_max >= 1.0 else f"up to {1.0 / (1.0 - mask_ratio_max):.3g}"
    return (f"note: complementary masking with the band [{mask_ratio_min:g}, {mask_ratio_max:g}] gives complement "
            f"rows mask ratios down to {1.0 - mask_ratio_max:g} and weights 1/(1 - t) {bound}; a bounded band "
            "(e.g. diffusion.mask_ratio_max=0.95, as configs/tiny_sft.yaml) keeps the loss from being heavy-tailed")


def sft_loss(cap_lambda: Optional[float]):
    """The SFT step's loss: the plain ELBO (``None``), or ELBO + ``cap_lambda * L_conf`` (:class:`CAPLoss`)."""
    return ELBO_LOSS if cap_lambda is None else CAPLoss(float(cap_lambda))


class SFTStage(Stage):
    """Packed SFT sequences; loss on response tokens; complementary masks; optional CAP."""

    name = "sft"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.loss = sft_loss(cfg.sft.cap_lambda)
        self._step_loss = self.loss  # this step's loss (CAP: with the step's global counts, see before_step)
        self.position = 0  # global sample position of the next step
        self.split: Optional[PackedSplit] = None
        self.pad_id = 0
        self.resolved: Optional[Resolved] = None

    def resolve_config(self, cfg: Config) -> None:
        """Before validation: one block size for the whole run, from ``train.init_from`` if not given."""
        self.resolved = resolve_post_training("sft", cfg)

    def prepare(self, cfg: Config) -> tuple[int, int]:
        if self.resolved is None:
            self.resolve_config(cfg)
        init, block, source = self.resolved.init, self.resolved.block, self.resolved.block_source
        tok = resolve_tokenizer(cfg.data, init.section("data") if init else None)
        s = cfg.sft
        self.split = load_packed_split("sft", cfg, tok, block, source, load_sft_dataset, "sft_demo.jsonl")
        self.pad_id = tok.pad_id
        cap = "off" if s.cap_lambda is None else f"lambda {s.cap_lambda}"
        say(f"sft: {len(self.split.train)} training / {len(self.split.valid)} validation sequences of "
            f"{cfg.data.seq_length} tokens; complementary masks {'on' if s.complementary else 'off'}; CAP {cap}")
        note = band_note(cfg.diffusion.mask_ratio_min, cfg.diffusion.mask_ratio_max) if s.complementary else None
        if note:
            say(note)
        return tok.vocab_size, tok.mask_id

    def make_batch(self, sequences: List[dict], rows: Sequence[Optional[int]], positions: Sequence[int],
                   block_size: int, mask_id: int, salt: str) -> DiffusionBatch:
        """Noise the rows (seeded per position) and lay them out; complementary rows follow as ``b + i``."""
        data = collate_rows(sequences, rows, self.pad_id, collate_packed)
        return make_batch(data["tokens"], data["doc_ids"], positions, block_size, mask_id,
                          noise_config(self.cfg.diffusion), self.cfg.train.seed, eligible=data["eligible"], salt=salt,
                          complementary=self.cfg.sft.complementary)

    def step_data(self, run: Run, block_size: int) -> StepData:
        def make(rows, positions):
            return self.make_batch(self.split.train, rows, positions, block_size, run.mask_id, "sft")

        data = self.split.step_data(self.position, self.cfg.train.micro_batch_size, run, make)
        self.position += self.cfg.train.global_batch_size
        return data

    def eval_data(self, run: Run, block_size: int) -> list[list[DiffusionBatch]]:
        """The held-out sequences with the same noise at every evaluation."""
        def make(rows, keys):
            return self.make_batch(self.split.valid, rows, keys, block_size, run.mask_id, "sft-valid")

        return self.split.eval_batches(self.cfg.train.micro_batch_size, run, self.cfg.logging.eval_iters, make)

    def before_step(self, run: Run, batches: List[DiffusionBatch], forward_only: bool) -> None:
        """CAP: ``L_conf``'s denominator is the global count of correct tokens, counted first (forward only)."""
        self._step_loss = self.loss
        if isinstance(self.loss, CAPLoss):
            with torch.no_grad():
                counted = forward_backward(run.model_chunks, batches, forward_only=True, loss_fn=CORRECT_COUNT)
            self._step_loss = self.loss.step_loss(counted.num_eligible, counted.metrics["correct"])

    def step_loss(self, run: Run, batches: List[DiffusionBatch]) -> StepLoss:
        return self._step_loss

    def state_dict(self) -> dict:
        return {"position": self.position, **(self.split.state_dict() if self.split else {})}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state.get("position", 0))
        if self.split is not None:
            self.split.check_state(state, "sft")


def main(argv=None) -> int:
    from .entry import stage_main

    return stage_main(argv, "sft", "sft", SFTStage)

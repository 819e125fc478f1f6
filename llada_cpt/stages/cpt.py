"""Stage ``cpt`` (``llada-cpt train``): block-diffusion continual pre-training on packed corpora.

Data: Megatron indexed datasets (or the embedded demo corpus) packed into
sequences of ``seq_length`` tokens with document ids from EOD tokens; each
micro-batch is laid out as ``[x_t ; x_0]`` (or MDLM) for the block size the WSD
schedule gives at that step.  Noise is seeded per global sample position, so
it does not depend on the data-parallel split or on restarts.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..config.schema import Config
from ..diffusion.inputs import DiffusionBatch, build_diffusion_batch
from ..diffusion.noise import NoiseConfig, sample_noise_per_row
from ..errors import ConfigError
from ..training.loop import Run, StepData



def sample_seed(base_seed: int, position: int, salt: str = "noise") -> int:
    """A stable 63-bit seed for one global sample position."""
    digest = hashlib.blake2b(f"{salt}:{base_seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def noise_config(cfg: Config) -> NoiseConfig:
    d = cfg.diffusion
    return NoiseConfig(d.mask_ratio_min, d.mask_ratio_max, d.per_block_timesteps)


def make_batch(tokens: torch.Tensor, doc_ids: torch.Tensor, positions: Sequence[int], block_size: int,
               mask_id: int, cfg: Config, eligible: Optional[torch.Tensor] = None, salt: str = "noise",
               complementary: bool = False) -> DiffusionBatch:
    """Noise one micro-batch with per-sample seeds and lay it out for the model (the batch builder of every
    stage that trains on the ELBO: CPT, SFT).

    The seeds of the global sample ``positions`` draw the mask (``t``, Bernoulli) and, through
    ``layout.row_seeds``, the masked-embedding noise, so neither depends on the data-parallel split or on
    restarts.  ``complementary`` appends each row's complement (rows ``b + i``), which shares its seed.
    """
    if eligible is None:
        eligible = torch.ones_like(tokens, dtype=torch.bool)
    seeds = [sample_seed(cfg.train.seed, p, salt) for p in positions]
    t, masked = sample_noise_per_row(doc_ids, eligible, block_size, noise_config(cfg), seeds)
    batch = build_diffusion_batch(tokens, doc_ids, block_size, mask_id, eligible=eligible, t=t, masked=masked,
                                  complementary=complementary)
    batch.layout.row_seeds = torch.tensor(seeds * (2 if complementary else 1), dtype=torch.long)
    return batch


def _parse_blend(entries: Sequence[str]) -> list:
    """``["prefix", ...]`` or ``["0.3 prefix_a", "0.7 prefix_b"]`` (Megatron's blend syntax)."""
    out = []
    for e in entries:
        parts = str(e).split()
        if len(parts) == 2:
            try:
                out.append((parts[1], float(parts[0])))
                continue
            except ValueError:
                pass
        if len(parts) != 1:
            raise ConfigError(f"data.train_data entry `{e}` must be `prefix` or `weight prefix`")
        out.append(parts[0])
    return out


@dataclass
class _Sources:
    train: list
    valid: list
    tokenizer: Optional[str]
    vocab_size: int
    mask_id: int


class CPTStage:
    """Pre-training on packed documents; every token is loss-eligible."""

    name = "cpt"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.train_iter = None
        self.valid_data = None
        self._start_samples = 0

    def _sources(self) -> _Sources:
        d = self.cfg.data
        if d.demo:
            from ..data.demo_corpus import ensure_demo_data

            demo = ensure_demo_data(d.cache_dir)
            return _Sources([demo.train_prefix], [demo.valid_prefix], demo.tokenizer_path, demo.vocab_size,
                            demo.mask_id)
        if not d.tokenizer:
            raise ConfigError("data.tokenizer is not set: give the SentencePiece .model or tokenizer.json used "
                              "by `llada-cpt preprocess` (it provides the vocabulary and the [MASK] id)")
        from ..data.tokenizer import Tokenizer

        tok = Tokenizer.from_file(d.tokenizer)
        valid = _parse_blend(d.valid_data) if d.valid_data else []
        return _Sources(_parse_blend(d.train_data), valid, d.tokenizer, tok.vocab_size, tok.mask_id)

    def prepare(self, cfg: Config) -> tuple[int, int]:
        from ..data.packed import PackedDataset

        src = self._sources()
        t = cfg.train
        L = cfg.data.seq_length
        cache = cfg.data.cache_dir
        num = t.train_steps * t.global_batch_size
        index_cache = None if cache is None else f"{cache}/index_cache"
        # without explicit validation data, hold out 2% of the training blend's documents
        split = "100,0,0" if src.valid else "98,2,0"
        self.train_ds = PackedDataset(src.train, L, seed=cfg.data.seed, num_samples=num, split=split,
                                      cache_dir=index_cache)
        if src.valid:
            self.valid_ds = PackedDataset(src.valid, L, seed=cfg.data.seed, cache_dir=index_cache)
        else:
            self.valid_ds = PackedDataset(src.train, L, seed=cfg.data.seed, split=split, split_name="valid",
                                          cache_dir=index_cache)
        if self.train_ds.vocab_size > src.vocab_size:
            raise ConfigError(f"the training data was tokenized with a vocabulary of {self.train_ds.vocab_size} "
                              f"tokens but the tokenizer has {src.vocab_size}; preprocess with this tokenizer")
        self.tokenizer_path = src.tokenizer
        return src.vocab_size, src.mask_id

    def _iterator(self, run: Run):
        from ..data.packed import PackedBatchIterator

        if self.train_iter is None:
            self.train_iter = PackedBatchIterator(self.train_ds, self.cfg.train.micro_batch_size, run.dp_rank,
                                                  run.dp_size, start_sample=self._start_samples)
        return self.train_iter

    def step_data(self, run: Run, block_size: int) -> StepData:
        it = self._iterator(run)
        m = self.cfg.train.micro_batch_size
        batches, indices = [], []
        for _ in range(run.micro_batches_per_step):
            first = it.consumed_samples + run.dp_rank * m
            try:
                mb = next(it)
            except StopIteration:
                raise ConfigError(f"the training data ran out after {it.consumed_samples} samples; "
                                  "add data or lower train.train_steps") from None
            batches.append(make_batch(mb["tokens"], mb["doc_ids"], range(first, first + m), block_size,
                                      run.mask_id, self.cfg))
            indices.extend(mb["index"].tolist())
        return StepData(batches, indices)

    def eval_data(self, run: Run, block_size: int) -> list[list[DiffusionBatch]]:
        """The same validation samples and noise at every evaluation (comparable numbers)."""
        m = self.cfg.train.micro_batch_size
        per_step = m * run.dp_size
        out = []
        for k in range(self.cfg.logging.eval_iters):
            first = k * per_step + run.dp_rank * m
            if first + m > len(self.valid_ds):
                break
            samples = [self.valid_ds[i] for i in range(first, first + m)]
            tokens = torch.stack([s["tokens"] for s in samples])
            docs = torch.stack([s["doc_ids"] for s in samples])
            out.append([make_batch(tokens, docs, range(first, first + m), block_size, run.mask_id, self.cfg,
                                   salt="valid")])
        if not out:
            raise ConfigError("the validation split holds fewer sequences than one micro-batch per DP rank; "
                              "add validation data or lower data.seq_length")
        return out

    def state_dict(self) -> dict:
        it = self.train_iter
        return {"consumed_samples": it.consumed_samples if it is not None else self._start_samples}

    def load_state_dict(self, state: dict) -> None:
        self._start_samples = int(state.get("consumed_samples", 0))
        self.train_iter = None


def main(argv=None) -> int:
    from .launcher import stage_main

    return stage_main(argv, "train", "cpt", CPTStage)

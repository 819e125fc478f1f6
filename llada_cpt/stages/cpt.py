"""Stage ``cpt`` (``llada-cpt train``): block-diffusion continual pre-training on packed corpora.

Data: Megatron indexed datasets (or the embedded demo corpus) packed into
sequences of ``seq_length`` tokens with document ids from EOD tokens; each
micro-batch is laid out as ``[x_t ; x_0]`` (or MDLM) for the block size the WSD
schedule gives at that step.  Noise is seeded per global sample position, so
it does not depend on the data-parallel split or on restarts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config.schema import Config
from ..data.packed import blend_from_config
from ..diffusion.inputs import DiffusionBatch
from ..diffusion.seeded import make_batch, noise_config
from ..errors import ConfigError
from ..training.loop import Run, StepData
from ..training.stage import Stage
from ..training.validation import packed_eval_batches


@dataclass
class _Sources:
    train: list
    valid: list
    tokenizer: Optional[str]
    vocab_size: int
    mask_id: int


class CPTStage(Stage):
    """Pre-training on packed documents; every token is loss-eligible."""

    name = "cpt"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
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
        from ..data.tokenizer import resolve_tokenizer

        tok = resolve_tokenizer(d, missing="data.tokenizer is not set: give the SentencePiece .model or "
                                "tokenizer.json used by `llada-cpt preprocess` (it provides the vocabulary and the "
                                "[MASK] id)")
        valid = blend_from_config(d.valid_data) if d.valid_data else []
        return _Sources(blend_from_config(d.train_data), valid, d.tokenizer, tok.vocab_size, tok.mask_id)

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
                                      run.mask_id, noise_config(self.cfg.diffusion), self.cfg.train.seed))
            indices.extend(mb["index"].tolist())
        return StepData(batches, indices)

    def eval_data(self, run: Run, block_size: int) -> list[list[DiffusionBatch]]:
        """The same validation samples and noise at every evaluation (comparable numbers)."""
        out = packed_eval_batches(self.valid_ds, self.cfg.train.micro_batch_size, run.dp_rank, run.dp_size,
                                  self.cfg.logging.eval_iters, block_size, run.mask_id,
                                  noise_config(self.cfg.diffusion), self.cfg.train.seed)
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
    from .entry import stage_main

    return stage_main(argv, "train", "cpt", CPTStage)

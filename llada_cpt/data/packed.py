"""Packed pre-training sequences with document ids, and a resumable DP iterator.

Sequences come from Megatron-Core's ``GPTDataset`` (document shuffling by
seed, train/valid/test split, epochs) blended by ``BlendedDataset`` (weights).
Two choices differ from autoregressive pre-training:

* ``add_extra_token_to_sequence=False``: a sample is exactly ``L`` tokens.
  Diffusion predicts masked tokens in place, so the ``L+1``-th token an AR
  model needs for its shifted labels would be wasted.
* ``doc_ids`` are recovered from EOD tokens: a document's EOD belongs to it
  and the next document starts right after.  A sequence that starts in the
  middle of a document simply calls that fragment document 0, so doc ids
  restart at 0 in every sequence.  This needs one EOD per document, which
  ``llada-cpt preprocess`` writes by default.

Index caches (``.npy``) are built on CPU under ``cache_dir``.  With
``torch.distributed`` initialised, rank 0 builds them and the other ranks wait
at a barrier, then load them (Megatron's builder protocol; every rank must
construct the dataset).  Without it, a file lock serialises processes that
share ``cache_dir``.  Megatron's C++ index helpers ship compiled in the
megatron-core wheels (cp311 and cp312), so nothing is compiled at run time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import ConfigError, DataError

__all__ = ["PackedDataset", "PackedBatchIterator", "doc_ids_from_eod", "parse_blend", "blend_from_config"]

BlendSpec = Sequence[Union[str, Tuple[str, float]]]
SPLIT_NAMES = ("train", "valid", "test")


def doc_ids_from_eod(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Document id of every position: the number of EOD tokens strictly before it.

    Works on ``[..., L]``; the EOD token belongs to the document it ends.
    """
    eod = (tokens == eod_id).long()
    return torch.cumsum(eod, dim=-1) - eod


def blend_from_config(entries: Sequence[str]) -> BlendSpec:
    """``data.train_data`` / ``data.valid_data`` (``["prefix", ...]`` or ``["0.3 prefix_a", "0.7 prefix_b"]``,
    Megatron's blend syntax) as a :data:`BlendSpec`."""
    out: list = []
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


def parse_blend(blend: BlendSpec) -> Tuple[List[str], Optional[List[float]]]:
    """``["a", "b"]`` or ``[("a", 0.3), ("b", 0.7)]`` -> (prefixes, weights or None)."""
    if isinstance(blend, (str, os.PathLike)):
        blend = [blend]
    if not blend:
        raise ConfigError("the data blend is empty; give at least one dataset prefix")
    prefixes: List[str] = []
    weights: List[float] = []
    for entry in blend:
        if isinstance(entry, (str, os.PathLike)):
            prefixes.append(os.fspath(entry))
        else:
            prefix, weight = entry
            if not (isinstance(weight, (int, float)) and weight > 0):
                raise ConfigError(f"blend weight of {prefix!r} must be a positive number, got {weight!r}")
            prefixes.append(os.fspath(prefix))
            weights.append(float(weight))
    if weights and len(weights) != len(prefixes):
        raise ConfigError("give a weight for every dataset prefix of the blend, or for none")
    return prefixes, (weights or None)


class _TokenizerInfo:
    """The slice of a Megatron tokenizer that ``GPTDataset`` reads.

    ``pad = -1`` because packed samples are never padded; ``unique_identifiers``
    enter Megatron's cache hash, and the layout tag keeps our L-token indices
    apart from L+1-token AR indices (Megatron does not hash that flag).
    """

    def __init__(self, eod: int, vocab_size: int) -> None:
        self.eod = eod
        self.vocab_size = vocab_size
        self.pad = -1
        self.unique_identifiers = {"class": "llada_cpt.packed", "layout": "L-tokens/no-extra-token",
                                   "eod": eod, "vocab_size": vocab_size}


def _megatron():
    with warnings.catch_warnings():  # megatron.core's import warns about missing TE/apex
        warnings.simplefilter("ignore")
        from megatron.core.datasets import blended_dataset, blended_megatron_dataset_builder, gpt_dataset
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError as err:
            raise DataError(
                f"Megatron-Core's compiled dataset helpers are missing ({err}); install a megatron-core "
                "wheel for this Python version, or run `make` in megatron/core/datasets") from err
    return gpt_dataset, blended_dataset, blended_megatron_dataset_builder


def _dataset_meta(prefix: str) -> dict:
    from .preprocess import read_dataset_meta

    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"dataset file {prefix + ext!r} not found; run `llada-cpt preprocess` "
                            "or pass the prefix without .bin/.idx")
    return read_dataset_meta(prefix)


@contextlib.contextmanager
def _logger_level(name: str, level: int):
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def _build_lock(cache_dir: str):
    """Serialise index building across processes that do not share a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield  # Megatron's rank-0-first barrier protocol; a lock here could deadlock it
        return
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class PackedDataset(torch.utils.data.Dataset):
    """Sequences of exactly ``seq_length`` tokens with per-position document ids.

    ``blend``: dataset prefixes, optionally with weights (then ``num_samples``
    is required).  ``num_samples=None`` gives one epoch.  ``split`` is
    Megatron's ``"train,valid,test"`` document split of every prefix and
    ``split_name`` picks the part this dataset serves.  ``eod_id`` and
    ``vocab_size`` default to the prefixes' ``.meta.json``.  Under
    ``torch.distributed`` every rank must construct it, in the same order as
    the other datasets (the index build synchronises with barriers).
    """

    def __init__(
        self,
        blend: BlendSpec,
        seq_length: int,
        *,
        seed: int = 1234,
        num_samples: Optional[int] = None,
        split: str = "100,0,0",
        split_name: str = "train",
        cache_dir: Optional[str] = None,
        eod_id: Optional[int] = None,
        vocab_size: Optional[int] = None,
    ) -> None:
        prefixes, weights = parse_blend(blend)
        if seq_length < 1:
            raise ConfigError(f"seq_length must be >= 1, got {seq_length}")
        if split_name not in SPLIT_NAMES:
            raise ConfigError(f"split_name must be one of {SPLIT_NAMES}, got {split_name!r}")
        if num_samples is not None and num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1 or None (one epoch), got {num_samples}")
        if weights is not None and len(prefixes) > 1 and num_samples is None:
            raise ConfigError("a weighted blend needs num_samples (how many sequences to draw); "
                              "set it or drop the weights to use every dataset once")
        self.eod_id, self.vocab_size = self._special_ids(prefixes, eod_id, vocab_size)
        self.seq_length = seq_length
        self.cache_dir = os.path.abspath(cache_dir or os.path.join(os.path.dirname(prefixes[0]) or ".",
                                                                   "index_cache"))
        with _build_lock(self.cache_dir):
            self._dataset = self._build(prefixes, weights, seed, num_samples, split, split_name)
        self._length = len(self._dataset) if num_samples is None else min(num_samples, len(self._dataset))
        if self._length == 0:
            raise DataError(f"the {split_name} split of {prefixes} holds fewer than {seq_length} tokens; "
                            "add data, lower seq_length or change the split")

    @staticmethod
    def _special_ids(prefixes: List[str], eod_id: Optional[int], vocab_size: Optional[int]) -> Tuple[int, int]:
        metas = [(p, _dataset_meta(p)) for p in prefixes]
        for prefix, meta in metas:
            if meta.get("append_eod") is False:
                raise DataError(f"{prefix!r} was preprocessed without EOD tokens, so documents cannot be "
                                "separated; re-run `llada-cpt preprocess` with --append-eod")
        resolved = []
        for name, given in (("eod_id", eod_id), ("vocab_size", vocab_size)):
            found = sorted({meta[name] for _, meta in metas if name in meta})
            if given is None and len(found) > 1:
                raise DataError(f"the blend's datasets disagree on {name} ({found}); "
                                "preprocess them with the same tokenizer")
            if given is None and not found:
                raise ConfigError(f"{name} is unknown: no .meta.json next to {prefixes}; pass {name}=")
            resolved.append(int(given if given is not None else found[0]))
        return resolved[0], resolved[1]

    def _build(self, prefixes, weights, seed, num_samples, split, split_name):
        gpt, blended, builder_mod = _megatron()
        # Every rank reads its own data, so every rank builds (Megatron: rank 0 first).
        is_built_on_rank = lambda: True  # noqa: E731
        which = SPLIT_NAMES.index(split_name)
        config = gpt.GPTDatasetConfig(
            random_seed=seed, sequence_length=self.seq_length, blend=([prefixes[0]], None), split=split,
            path_to_cache=self.cache_dir, tokenizer=_TokenizerInfo(self.eod_id, self.vocab_size),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, add_extra_token_to_sequence=False,
            drop_last_partial_validation_sequence=True, mid_level_dataset_surplus=0.005)
        if config.split_matrix[which] is None:
            raise ConfigError(f"split {split!r} gives the {split_name} part no documents; change the split")

        # Per-prefix sample counts as Megatron's builder computes them (plus its surplus).
        if len(prefixes) == 1:
            sizes: List[Optional[int]] = [num_samples]
        elif weights is not None:
            total = sum(weights)
            targets = [math.ceil(num_samples * w / total) for w in weights]
            sizes = [math.ceil(t * (1 + config.mid_level_dataset_surplus)) for t in targets]
        else:
            sizes = [None] * len(prefixes)

        def mid_level(prefix: str, size: Optional[int]):
            cfg = dataclasses.replace(config, blend=([prefix], None))
            split_sizes = [None] * len(SPLIT_NAMES)
            split_sizes[which] = size
            return builder_mod.BlendedMegatronDatasetBuilder(
                gpt.GPTDataset, split_sizes, is_built_on_rank, cfg).build()[which]

        parts = [mid_level(p, s) for p, s in zip(prefixes, sizes)]
        if len(parts) == 1:
            return parts[0]
        if weights is not None:
            blend_weights, blend_size = weights, sum(targets)
        else:
            blend_weights = [len(p) for p in parts]
            blend_size = None if num_samples is None else min(num_samples, sum(blend_weights))
        # Megatron's BlendedDataset calls get_rank() on a cache miss even without a process
        # group; single processes therefore keep the (cheap) blending index in memory.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        blend_cfg = config if distributed else dataclasses.replace(config, path_to_cache=None)
        with contextlib.ExitStack() as stack:
            if not distributed:  # silence its "cannot save the indexes" warning: intended here
                stack.enter_context(_logger_level(blended.__name__, logging.ERROR))
            return builder_mod.BlendedMegatronDatasetBuilder.build_generic_dataset(
                blended.BlendedDataset, is_built_on_rank, True, parts, blend_weights, blend_size, blend_cfg)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, int]]:
        if not 0 <= index < self._length:
            raise IndexError(f"sample {index} out of range [0, {self._length})")
        tokens = self._dataset[index]["tokens"]
        return {"tokens": tokens, "doc_ids": doc_ids_from_eod(tokens, self.eod_id), "index": index}


class PackedBatchIterator:
    """Micro-batches of one data-parallel rank, driven by a global sample counter.

    Step ``s`` covers global samples ``[c, c + m*dp)`` with ``c`` the consumed
    count; rank ``r`` takes ``[c + r*m, c + (r+1)*m)``.  So every rank sees
    disjoint samples, and the state is a single number: the consumed count,
    which resumes exactly, also under another ``dp_size`` (as Megatron's sampler).
    Iteration stops before the first incomplete global micro-batch.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        start_sample: int = 0,
    ) -> None:
        if micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.load_state_dict({"consumed_samples": start_sample})

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self._consumed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ConfigError(f"consumed_samples must be >= 0, got {consumed}")
        self._consumed = consumed

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __len__(self) -> int:
        """Micro-batches left for this rank."""
        return max(0, (len(self.dataset) - self._consumed) // self.global_micro_batch)

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._consumed + self.global_micro_batch > len(self.dataset):
            raise StopIteration
        first = self._consumed + self.dp_rank * self.micro_batch_size
        samples = [self.dataset[i] for i in range(first, first + self.micro_batch_size)]
        self._consumed += self.global_micro_batch
        return {
            "tokens": torch.stack([s["tokens"] for s in samples]),
            "doc_ids": torch.stack([s["doc_ids"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        }

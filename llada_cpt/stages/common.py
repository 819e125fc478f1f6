"""What the post-training stages (``sft``, ``dpo``) share.

* :func:`init_or_none`: the checkpoint ``train.init_from`` names (a
  :class:`~llada_cpt.checkpoint.info.CheckpointInfo`): its tokenizer, trained
  block size, final learning rate (:func:`final_lr`) and model architecture are
  the defaults / checks of the next stage.
* :func:`resolve_post_training`: what a stage takes from that checkpoint, written
  into the config *before* it is validated (and so saved as validated).
* :func:`resolve_block_size`, :func:`data_paths`.
* :class:`PackedSplit` (built by :func:`load_packed_split`): packed JSONL sequences split into train / validation,
  the epoch order of the training sequences and the rows of every micro-batch.
  Row ``p`` of the run (a global sample position) is the same sequence with the
  same noise whatever the data-parallel split, so loss and resume do not depend
  on the layout.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..checkpoint.info import CheckpointInfo
from ..config.schema import Config, PostTrainDataConfig
from ..errors import ConfigError, DataError
from ..training.loop import Run, StepData

__all__ = ["say", "final_lr", "init_or_none", "Resolved", "resolve_post_training", "resolve_block_size",
           "data_paths", "bundled_path", "PackedSplit", "load_packed_split", "collate_rows", "print_stats"]

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "bundled"


def say(msg: str) -> None:
    """Print once (rank 0)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def final_lr(init: CheckpointInfo) -> Optional[float]:
    """The learning rate ``init``'s run would have used next (its scheduler at its iteration): DPO's default."""
    if "train" not in (init.saved_config or {}):
        return None
    from ..config.loader import config_from_dict
    from ..training.optimizer import build_scheduler

    try:
        cfg = config_from_dict({"train": init.section("train")})
    except ConfigError:
        return None
    fake = types.SimpleNamespace(param_groups=[{}])  # the scheduler only writes param_groups[i]["lr"]
    sched = build_scheduler(cfg, fake)
    sched.step(increment=init.iteration)
    return float(fake.param_groups[0]["lr"])


def resolve_block_size(stage: str, cfg: Config, init: Optional[CheckpointInfo]) -> tuple[int, str]:
    """``(block size, where it came from)``: ``<stage>.block_size``, else the init checkpoint's
    trained block size (capped at ``seq_length``: MDLM stays MDLM), else the last phase of
    ``diffusion.block_schedule``.  Post-training packs samples to whole blocks of this size."""
    L = cfg.data.seq_length
    explicit = getattr(cfg, stage).block_size
    if explicit:
        return explicit, f"{stage}.block_size"
    trained = init.trained_block_size if init else None
    if trained:
        block = min(trained, L)
        if L % block:
            raise ConfigError(f"the init checkpoint's trained block size {trained} does not divide "
                              f"data.seq_length={L}; set {stage}.block_size to a divisor of {L}")
        return block, f"the trained block size of {init.path}"
    return min(cfg.diffusion.block_schedule[-1][0], L), "diffusion.block_schedule"


@dataclass(frozen=True)
class Resolved:
    """The init checkpoint of a post-training stage and the one block size of its run."""

    init: Optional[CheckpointInfo]
    block: int
    block_source: str


def resolve_post_training(stage: str, cfg: Config) -> Resolved:
    """Write the values a post-training stage takes from ``train.init_from`` into ``cfg``: one block size
    for the whole run (``diffusion.block_schedule = [[B, 1]]``).  Called before the config is validated,
    so the validated, printed (``--dry-run``) and saved config is the one the run uses; idempotent."""
    init = init_or_none(cfg)
    block, source = resolve_block_size(stage, cfg, init)
    cfg.diffusion.block_schedule = [[block, 1]]
    return Resolved(init, block, source)


def bundled_path(name: str) -> str:
    return str(BUNDLED / name)


def data_paths(section: PostTrainDataConfig, cfg: Config, stage: str, bundled: str) -> List[str]:
    """``<stage>.data``, else ``data.sft_data``, else (``data.demo``) the bundled demo file."""
    if section.data:
        return list(section.data)
    if cfg.data.sft_data:
        return [cfg.data.sft_data]
    if cfg.data.demo:
        return [bundled_path(bundled)]
    raise ConfigError(f"no {stage.upper()} data: set {stage}.data=[file.jsonl] or data.demo=true")


def _empty_sequence(like: Dict[str, list], pad_id: int) -> Dict[str, list]:
    """A row without loss: pad tokens in one document, nothing eligible (fills uneven batches)."""
    L = len(like["tokens"])
    fill = {"tokens": pad_id, "doc_ids": 0, "eligible": False, "sample_index": -1}
    return {k: [fill[k]] * L for k in like}


def collate_rows(sequences: Sequence[Dict[str, list]], rows: Sequence[Optional[int]], pad_id: int,
                 collate) -> Dict[str, torch.Tensor]:
    """Stack ``sequences[i]`` for each row (``None``: an empty row) with ``collate``."""
    picked = [sequences[i] if i is not None else _empty_sequence(sequences[0], pad_id) for i in rows]
    return collate(picked)


@dataclass
class PackedSplit:
    """Packed sequences of a post-training stage, split into train / validation, and their order."""

    train: List[Dict[str, list]]
    valid: List[Dict[str, list]]
    seed: int
    _epoch: int = field(default=-1, repr=False)  # the epoch whose permutation is cached
    _perm: List[int] = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, train: List[Dict[str, list]], valid: Optional[List[Dict[str, list]]], fraction: float,
              seed: int, what: str) -> "PackedSplit":
        """Without validation data, every ``round(1 / fraction)``-th packed sequence is held out."""
        if valid is None:
            if len(train) < 2:
                raise DataError(f"{what}: {len(train)} packed sequence(s) cannot be split into train and "
                                "validation; add data or give validation data (valid_data)")
            every = max(2, round(1 / fraction))
            held = set(range(every - 1, len(train), every)) or {len(train) - 1}
            valid = [s for i, s in enumerate(train) if i in held]
            train = [s for i, s in enumerate(train) if i not in held]
        return cls(train, valid, seed)

    def index(self, position: int) -> tuple[int, int]:
        """``(sequence index, epoch)`` of global sample position ``position``: each epoch is a fresh
        seeded permutation, so long runs revisit the data in a new order."""
        n = len(self.train)
        epoch, offset = divmod(position, n)
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(n, generator=g).tolist()
            self._epoch = epoch
        return self._perm[offset], epoch

    @staticmethod
    def positions(base: int, micro: int, m: int, dp_rank: int, dp_size: int) -> range:
        """Global sample positions of micro-batch ``micro`` of a step starting at ``base`` on ``dp_rank``."""
        first = base + micro * m * dp_size + dp_rank * m
        return range(first, first + m)

    def eval_rows(self, m: int, dp_rank: int, dp_size: int, iters: int) -> List[List[Optional[int]]]:
        """Validation rows per evaluation micro-batch (``None`` past the end: an empty row).

        Every DP rank gets the same number of micro-batches; empty rows carry no
        loss, so the validation loss is exactly that of the held-out sequences seen.
        """
        n = len(self.valid)
        per_step = m * dp_size
        steps = max(1, min(iters, -(-n // per_step)))
        return [[i if i < n else None for i in self.positions(0, k, m, dp_rank, dp_size)] for k in range(steps)]

    def step_data(self, base: int, m: int, run: Run, make: Callable[[List[int], range], Any]) -> StepData:
        """The micro-batches of this rank for the step starting at sample position ``base``.

        ``make(rows, positions)`` builds one micro-batch from the training sequence
        indices and their global sample positions (the noise seeds).
        """
        batches, indices = [], []
        for k in range(run.micro_batches_per_step):
            positions = self.positions(base, k, m, run.dp_rank, run.dp_size)
            rows = [self.index(p)[0] for p in positions]
            batches.append(make(rows, positions))
            indices.extend(rows)
        return StepData(batches, indices)

    def eval_batches(self, m: int, run: Run, iters: int, make: Callable[[List[Optional[int]], List[int]], Any]) -> list:
        """One single-micro-batch step per :meth:`eval_rows` entry, built by ``make(rows, keys)``.

        The keys seed the noise: the row index, or a distinct negative number for an
        empty row, so every evaluation sees the same noise.
        """
        out = []
        for rows in self.eval_rows(m, run.dp_rank, run.dp_size, iters):
            keys = [i if i is not None else -1 - j for j, i in enumerate(rows)]
            out.append([make(rows, keys)])
        return out

    def state_dict(self) -> dict:
        return {"train_sequences": len(self.train), "valid_sequences": len(self.valid)}

    def check_state(self, state: dict, what: str) -> None:
        n = state.get("train_sequences")
        if n is not None and n != len(self.train):
            say(f"note: the {what} data packs into {len(self.train)} training sequences, the checkpoint saw {n}; "
                "the data position continues but the order differs from the original run")


def load_packed_split(stage: str, cfg: Config, tokenizer: Any, block: int, block_source: str,
                      load: Callable, bundled: str) -> PackedSplit:
    """A post-training stage's JSONL (``<stage>.data``, :func:`data_paths`) read by ``load(paths, tokenizer,
    SFTDataConfig)`` (SFT samples, preference pairs), packed to whole blocks of ``block``, reported, and split
    into train / validation (``<stage>.valid_data``, else every n-th sequence held out)."""
    from ..data.sft import SFTDataConfig

    section: PostTrainDataConfig = getattr(cfg, stage)
    data_cfg = SFTDataConfig(cfg.data.seq_length, block, section.chat_template, section.overlong, section.pad_loss)
    paths = data_paths(section, cfg, stage, bundled)
    train = load(paths, tokenizer, data_cfg)
    print_stats(stage, train.stats, block, block_source, paths)
    valid = None
    if section.valid_data:
        held = load(section.valid_data, tokenizer, data_cfg)
        print_stats(f"{stage} validation", held.stats, block, block_source, section.valid_data)
        valid = held.sequences
    return PackedSplit.build(train.sequences, valid, section.valid_fraction, cfg.data.seed, f"{stage} data")


def print_stats(what: str, stats: Any, block: int, source: str, paths: Sequence[str]) -> None:
    """The data report at start: counts of samples, truncated / dropped ones and bad lines."""
    say(f"{what} data ({', '.join(paths)}; block size {block} from {source}): {stats.summary()}")


def init_or_none(cfg: Config) -> Optional[CheckpointInfo]:
    """The init checkpoint, checked against the model section."""
    if not cfg.train.init_from:
        return None
    init = CheckpointInfo.read(cfg.train.init_from)
    init.check_model(cfg.model)
    return init


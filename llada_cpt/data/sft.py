"""SFT data: JSONL records -> block-aligned samples -> packed sequences with document ids.

Records are ``{"prompt": str, "response": str}`` or ``{"messages": [{role, content}, ...]}``
(last message from the assistant), rendered by :mod:`llada_cpt.data.chat`.  Only
assistant tokens (and the closing EOD) are loss-eligible.

**Effective length** (report section 5.1): each sample's length is rounded up to a
multiple of the block size ``B`` so that its blocks coincide with attention
blocks.  The padding is EOD and, by default (``pad_loss=True``), *loss-eligible*:
the report does not say, but LLaDA (Nie et al. 2025, section 2.4) pads SFT
responses with EOS and trains on it, and the block sampler needs exactly that,
since it must fill every position of the last block and can only stop by
predicting EOD there.  ``pad_loss=False`` keeps the EOD padding as context only.

**Packing**: samples (one document each, doc ids restart per sequence) go into
sequences of ``seq_length`` tokens by best fit over whole blocks, so every sample
starts on a block boundary; the unused tail is ``pad_id`` filler in a document of
its own that carries no loss.  A sample whose effective length exceeds
``seq_length`` is dropped, truncated to ``seq_length`` (``truncate``: the prompt is
kept, the response cut, no closing EOD) or reported as bad (``error``).

**Complementary masking** needs a sample and its complement in the same
micro-batch; ``llada_cpt.diffusion.inputs.build_diffusion_batch(...,
complementary=True)`` does that by emitting sequence ``i`` with mask ``m`` as row
``i`` and with ``eligible & ~m`` as row ``b + i``, so every eligible token is
masked in exactly one of the two rows and prompt tokens in neither.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union, get_args

import torch

from ..config.schema import OverlongPolicy
from ..errors import ConfigError, DataError
from .chat import TEMPLATES, ChatTokens, tokenize_chat, tokenize_prompt_response, validate_messages
from .records import LineReport, PathLike, RecordError, as_paths, iter_jsonl

__all__ = [
    "OVERLONG_POLICIES",
    "SFTDataConfig",
    "Sample",
    "PackStats",
    "PackedData",
    "effective_length",
    "pad_to_block",
    "padded_sample",
    "truncate_sample",
    "sft_record_tokens",
    "load_records",
    "load_sft_samples",
    "pack_groups",
    "collate_packed",
    "load_sft_dataset",
]

OVERLONG_POLICIES = get_args(OverlongPolicy)

T = TypeVar("T")  # a record's tokens
R = TypeVar("R")  # what is kept of it


@dataclass(frozen=True)
class SFTDataConfig:
    """How SFT / DPO records become packed sequences."""

    seq_length: int
    block_size: int
    chat_template: str = "auto"
    overlong: str = "drop"  # drop | truncate | error
    pad_loss: bool = True  # the EOD padding up to the effective length carries loss

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.seq_length < 1 or self.seq_length % self.block_size:
            raise ConfigError(
                f"SFT block size {self.block_size} must divide seq_length {self.seq_length} "
                "(samples are padded to whole blocks)"
            )
        if self.overlong not in OVERLONG_POLICIES:
            raise ConfigError(f"overlong policy {self.overlong!r}; use one of {', '.join(OVERLONG_POLICIES)}")
        if self.chat_template not in TEMPLATES:
            raise ConfigError(f"chat template {self.chat_template!r}; use one of {', '.join(TEMPLATES)}")


@dataclass(frozen=True)
class Sample:
    """One document: token ids, loss-eligible flags and where it came from (``file:line``)."""

    ids: List[int]
    eligible: List[bool]
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_eligible(self) -> int:
        return sum(self.eligible)


@dataclass
class PackStats:
    """What happened to the input; logged by the stage and asserted by tests."""

    samples: int = 0  # usable samples (pairs, for preference data)
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0  # truncation left no loss-eligible token
    sequences: int = 0
    tokens: int = 0  # non-filler tokens placed in sequences
    eligible_tokens: int = 0
    filler_tokens: int = 0
    bad: LineReport = field(default_factory=LineReport)

    @property
    def lines(self) -> int:
        return self.bad.lines

    def summary(self) -> str:
        used = self.tokens / max(1, self.tokens + self.filler_tokens)
        text = (
            f"{self.samples} samples from {self.lines} lines -> {self.sequences} sequences "
            f"({used:.1%} filled, {self.eligible_tokens} loss tokens); truncated {self.truncated}, "
            f"dropped {self.dropped_overlong} over-long + {self.dropped_no_target} without target"
        )
        return text + (f"; {self.bad.summary()}" if self.bad.total else "")


def effective_length(n: int, block_size: int) -> int:
    """``n`` rounded up to a multiple of the block size (report section 5.1)."""
    return -(-n // block_size) * block_size


def pad_to_block(tokens: Sample, block_size: int, eod_id: int, pad_loss: bool) -> Sample:
    """Pad with EOD to the effective length; the padding trains iff ``pad_loss``."""
    extra = effective_length(len(tokens), block_size) - len(tokens)
    return Sample(tokens.ids + [eod_id] * extra, tokens.eligible + [pad_loss] * extra, tokens.source)


def padded_sample(tokens: ChatTokens, source: str, cfg: SFTDataConfig, eod_id: int) -> Sample:
    """One tokenized response (from line ``source``) as a sample padded to whole blocks."""
    return pad_to_block(Sample(tokens.ids, tokens.eligible, source), cfg.block_size, eod_id, cfg.pad_loss)


def truncate_sample(sample: Sample, limit: int) -> Sample:
    """Keep the first ``limit`` tokens (the prompt survives, the response is cut)."""
    return Sample(sample.ids[:limit], sample.eligible[:limit], sample.source)


def record_messages(record: dict, key: str = "messages", need_assistant_last: bool = True) -> list:
    """Validated ``record[key]`` messages, as a ``RecordError`` when malformed."""
    try:
        return validate_messages(record[key], need_assistant_last)
    except ValueError as e:
        raise RecordError("invalid messages", f"{key}: {e}") from None


def record_text(record: dict, key: str, allow_empty: bool = False) -> str:
    """A required string field, non-blank unless ``allow_empty``."""
    if key not in record:
        raise RecordError("missing field", f"missing field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError("wrong type", f"'{key}' must be a string")
    if not allow_empty and not value.strip():
        raise RecordError("empty field", f"'{key}' is empty")
    return value


def tokenized(fn, *args) -> ChatTokens:
    """Run a chat tokenizer call, turning template problems into a ``RecordError``."""
    try:
        return fn(*args)
    except RecordError:
        raise
    except ValueError as e:
        raise RecordError("template", str(e)) from None


def sft_record_tokens(record: dict, tokenizer: Any, template: str) -> ChatTokens:
    """Tokens of one SFT record; ``RecordError`` names what is wrong with it."""
    if "messages" in record:
        return tokenized(tokenize_chat, record_messages(record), tokenizer, template)
    if "prompt" not in record and "response" not in record:
        raise RecordError("missing field", "expected {prompt, response} or {messages}")
    prompt = record_text(record, "prompt", allow_empty=True)
    return tokenized(tokenize_prompt_response, prompt, record_text(record, "response"), tokenizer, template)


def fit_sample(sample: Sample, cfg: SFTDataConfig, stats: PackStats) -> Optional[Sample]:
    """Apply the over-long policy to a block-padded sample; None when it is dropped."""
    limit = cfg.seq_length
    if len(sample) <= limit:
        return sample
    if cfg.overlong == "error":
        stats.bad.add(sample.source, f"{len(sample)} tokens after padding exceed {limit}", "over-long")
        return None
    if cfg.overlong == "drop":
        stats.dropped_overlong += 1
        return None
    cut = truncate_sample(sample, limit)
    if not any(cut.eligible):
        stats.dropped_no_target += 1
        return None
    stats.truncated += 1
    return cut


def raise_if_overlong(stats: PackStats, cfg: SFTDataConfig) -> None:
    """Policy ``error``: any over-long record stops loading, after all were collected."""
    if cfg.overlong == "error" and stats.bad.counts.get("over-long"):
        raise DataError(
            f"{stats.bad.counts['over-long']} record(s) are longer than seq_length {cfg.seq_length}: "
            f"{stats.bad.summary()}. Fix: raise seq_length or set the overlong policy to drop or truncate"
        )


def load_records(
    paths: Union[PathLike, Sequence[PathLike]],
    cfg: SFTDataConfig,
    tokenize: Callable[[dict], T],
    fit: Callable[[str, T, PackStats], Optional[R]],
    what: str,
    expected: str,
) -> Tuple[List[R], PackStats]:
    """The read loop of SFT samples and preference pairs: bad lines are counted, not fatal.

    ``tokenize`` turns a record into tokens or raises :class:`RecordError` (a bad
    line); ``fit`` pads and length-checks them (``None``: dropped or over-long).
    Policy ``error`` stops only after every line was read, so the message counts
    all over-long records; ``what`` / ``expected`` name the items and the line
    format when nothing usable is left.
    """
    stats = PackStats()
    items: List[R] = []
    for where, record in iter_jsonl(as_paths(paths), stats.bad):
        try:
            tokens = tokenize(record)
        except RecordError as e:
            stats.bad.add(where, str(e), e.kind)
            continue
        item = fit(where, tokens, stats)
        if item is not None:
            items.append(item)
    raise_if_overlong(stats, cfg)
    stats.samples = len(items)
    stats.bad.check(len(items), what, expected)
    return items, stats


def load_sft_samples(
    paths: Union[PathLike, Sequence[PathLike]], tokenizer: Any, cfg: SFTDataConfig
) -> Tuple[List[Sample], PackStats]:
    """Read, tokenize, pad and length-check every record; bad lines are counted, not fatal."""

    def fit(where: str, tokens: ChatTokens, stats: PackStats) -> Optional[Sample]:
        return fit_sample(padded_sample(tokens, where, cfg, tokenizer.eod_id), cfg, stats)

    return load_records(
        paths, cfg, lambda record: sft_record_tokens(record, tokenizer, cfg.chat_template), fit, "SFT samples",
        "each line must be {\"prompt\": ..., \"response\": ...} or {\"messages\": [...]} ending with an "
        "assistant turn, within seq_length tokens",
    )


def pack_groups(
    groups: Sequence[Sequence[Sample]],
    seq_length: int,
    block_size: int,
    pad_id: int,
    stats: Optional[PackStats] = None,
    with_sample_index: bool = False,
) -> List[Dict[str, list]]:
    """Best-fit packing of block-padded samples; the samples of one group share a sequence.

    Each sample is one document (doc ids ``0, 1, ...`` per sequence, filler gets the
    next id).  ``with_sample_index`` adds ``sample_index``: the sample's number in
    its sequence (``doc_id``) on its tokens and -1 on filler (DPO pairs are then
    samples ``2k, 2k + 1``).
    """
    n_blocks = seq_length // block_size
    bins: List[List[Sample]] = []
    by_free: List[List[int]] = [[] for _ in range(n_blocks + 1)]  # free blocks -> open bins
    for group in groups:
        sizes = [len(s) for s in group]
        if any(n % block_size for n in sizes) or sum(sizes) > seq_length:
            raise ValueError(f"group of sizes {sizes} is not block-padded or exceeds seq_length {seq_length}")
        need = sum(sizes) // block_size
        free = next((f for f in range(need, n_blocks + 1) if by_free[f]), None)
        if free is None:
            bins.append([])
            idx, free = len(bins) - 1, n_blocks
        else:
            idx = by_free[free].pop()
        bins[idx].extend(group)
        if free > need:
            by_free[free - need].append(idx)
    sequences = []
    for samples in bins:
        tokens: List[int] = []
        doc_ids: List[int] = []
        eligible: List[bool] = []
        for d, s in enumerate(samples):
            tokens += s.ids
            doc_ids += [d] * len(s)
            eligible += s.eligible
        used = len(tokens)
        filler = seq_length - used
        seq = {
            "tokens": tokens + [pad_id] * filler,
            "doc_ids": doc_ids + [len(samples)] * filler,
            "eligible": eligible + [False] * filler,
        }
        if with_sample_index:
            seq["sample_index"] = doc_ids + [-1] * filler
        sequences.append(seq)
        if stats is not None:
            stats.tokens += used
            stats.filler_tokens += filler
            stats.eligible_tokens += sum(eligible)
    if stats is not None:
        stats.sequences += len(sequences)
    return sequences


def collate_packed(sequences: Sequence[Dict[str, list]]) -> Dict[str, torch.Tensor]:
    """Stack packed sequences into ``[b, L]`` tensors (long ids, bool eligible)."""
    out = {}
    for key in sequences[0]:
        dtype = torch.bool if key == "eligible" else torch.long
        out[key] = torch.tensor([s[key] for s in sequences], dtype=dtype)
    return out


@dataclass
class PackedData:
    """Map-style dataset of packed sequences (``__getitem__`` gives ``[L]`` tensors)."""

    sequences: List[Dict[str, list]]
    stats: PackStats

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {k: v[0] for k, v in collate_packed([self.sequences[i]]).items()}


def load_sft_dataset(paths: Union[PathLike, Sequence[PathLike]], tokenizer: Any, cfg: SFTDataConfig) -> PackedData:
    """JSONL files -> packed SFT sequences ``{tokens, doc_ids, eligible}`` of length ``seq_length``."""
    samples, stats = load_sft_samples(paths, tokenizer, cfg)
    seqs = pack_groups([[s] for s in samples], cfg.seq_length, cfg.block_size, tokenizer.pad_id, stats)
    return PackedData(seqs, stats)

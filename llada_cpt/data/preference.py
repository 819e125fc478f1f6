"""Preference (DPO) data: ``{prompt, chosen, rejected}`` JSONL -> packed pairs.

Record forms:

* ``{"prompt": str, "chosen": str, "rejected": str}``;
* ``{"messages": [...context...], "chosen": ..., "rejected": ...}`` where each
  response is a string, one assistant message ``{role, content}``, or a list of
  messages continuing the conversation and ending with the assistant.

Only the chosen / rejected turns are loss-eligible (assistant turns inside the
context are not: DPO compares the two continuations).  Both members are padded
to whole blocks like SFT samples (:mod:`llada_cpt.data.sft`) and packed together
into one sequence as documents ``2k`` (chosen) and ``2k + 1`` (rejected), so that
:func:`llada_cpt.diffusion.dpo.sample_pair_noise` can give them the same noise
and the per-sample ELBO can be formed with ``sample_index``.

Over-long pairs (padded chosen + rejected longer than ``seq_length``) follow the
SFT policy; ``truncate`` cuts only the longer response when the shorter one fits
in half the sequence, else cuts both to half (whole blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import ConfigError
from .chat import ChatTokens, tokenize_chat, tokenize_prompt_response
from .records import PathLike, RecordError
from .sft import (
    PackedData,
    PackStats,
    Sample,
    SFTDataConfig,
    collate_packed,
    load_records,
    pack_groups,
    padded_sample,
    record_messages,
    record_text,
    tokenized,
    truncate_sample,
)

__all__ = [
    "PreferencePair",
    "preference_record_tokens",
    "load_preference_pairs",
    "load_preference_dataset",
    "collate_pairs",
]


@dataclass(frozen=True)
class PreferencePair:
    chosen: Sample
    rejected: Sample


def _continuation(record: dict, key: str) -> list:
    """A response as messages: string, one assistant message, or a list ending with the assistant."""
    if key not in record:
        raise RecordError("missing field", f"missing field '{key}'")
    value = record[key]
    if isinstance(value, str):
        return [{"role": "assistant", "content": record_text(record, key)}]
    if isinstance(value, dict):
        return record_messages({key: [value]}, key)
    if isinstance(value, list):
        return record_messages(record, key)
    raise RecordError("wrong type", f"'{key}' must be a string, an assistant message or a list of messages")


def preference_record_tokens(record: dict, tokenizer: Any, template: str) -> Tuple[ChatTokens, ChatTokens]:
    """Tokens of the chosen and rejected conversations of one record."""
    if "messages" in record:
        context = record_messages(record, "messages", need_assistant_last=False)
    elif "prompt" in record:
        context = [{"role": "user", "content": record_text(record, "prompt", allow_empty=True)}]
    else:
        raise RecordError("missing field", "expected {prompt, chosen, rejected} or {messages, chosen, rejected}")
    responses = (_continuation(record, "chosen"), _continuation(record, "rejected"))
    if responses[0] == responses[1]:
        raise RecordError("identical responses", "'chosen' and 'rejected' are identical (no preference signal)")
    if template == "raw" and "prompt" in record and all(len(r) == 1 for r in responses):
        prompt = context[0]["content"]
        return tuple(  # type: ignore[return-value]
            tokenized(tokenize_prompt_response, prompt, r[0]["content"], tokenizer, template) for r in responses
        )
    return tuple(  # type: ignore[return-value]
        tokenized(tokenize_chat, context + r, tokenizer, template, len(context)) for r in responses
    )


def _fit_pair(pair: PreferencePair, cfg: SFTDataConfig, stats: PackStats) -> Optional[PreferencePair]:
    """Apply the over-long policy to a block-padded pair; None when it is dropped."""
    L, B = cfg.seq_length, cfg.block_size
    c, r = len(pair.chosen), len(pair.rejected)
    if c + r <= L:
        return pair
    if cfg.overlong == "error":
        stats.bad.add(pair.chosen.source, f"chosen + rejected take {c + r} tokens after padding, over {L}", "over-long")
        return None
    if cfg.overlong == "drop":
        stats.dropped_overlong += 1
        return None
    half = (L // 2) // B * B
    if min(c, r) <= half:
        limits = (L - r, r) if c > r else (c, L - c)
    else:
        limits = (half, half)
    cut = PreferencePair(truncate_sample(pair.chosen, limits[0]), truncate_sample(pair.rejected, limits[1]))
    if not (any(cut.chosen.eligible) and any(cut.rejected.eligible)):
        stats.dropped_no_target += 1
        return None
    stats.truncated += 1
    return cut


def load_preference_pairs(
    paths: Union[PathLike, Sequence[PathLike]], tokenizer: Any, cfg: SFTDataConfig
) -> Tuple[List[PreferencePair], PackStats]:
    """Read, tokenize, pad and length-check every pair; bad lines are counted, not fatal."""
    if cfg.seq_length < 2 * cfg.block_size:
        raise ConfigError(
            f"DPO packs a pair per sequence: seq_length {cfg.seq_length} must hold two blocks of {cfg.block_size}"
        )

    def fit(where: str, tokens: Tuple[ChatTokens, ChatTokens], stats: PackStats) -> Optional[PreferencePair]:
        chosen, rejected = (padded_sample(t, where, cfg, tokenizer.eod_id) for t in tokens)
        return _fit_pair(PreferencePair(chosen, rejected), cfg, stats)

    return load_records(
        paths, cfg, lambda record: preference_record_tokens(record, tokenizer, cfg.chat_template), fit,
        "preference pairs",
        "each line must be {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...} (or \"messages\" instead of "
        "\"prompt\") with two different non-empty responses",
    )


def load_preference_dataset(
    paths: Union[PathLike, Sequence[PathLike]], tokenizer: Any, cfg: SFTDataConfig
) -> PackedData:
    """JSONL files -> packed sequences ``{tokens, doc_ids, eligible, sample_index}``."""
    pairs, stats = load_preference_pairs(paths, tokenizer, cfg)
    groups = [[p.chosen, p.rejected] for p in pairs]
    seqs = pack_groups(groups, cfg.seq_length, cfg.block_size, tokenizer.pad_id, stats, with_sample_index=True)
    return PackedData(seqs, stats)


def collate_pairs(sequences: Sequence[Dict[str, list]]) -> Dict[str, torch.Tensor]:
    """Stack packed pair sequences; ``sample_index`` becomes unique across the micro-batch.

    Pair ``p`` of the batch has chosen index ``2p`` and rejected ``2p + 1``, so
    ``elbo_from_token_loss(...).view(-1, 2)`` gives ``[P, (chosen, rejected)]``.
    """
    batch = collate_packed(sequences)
    idx = batch["sample_index"]
    counts = idx.max(dim=1).values + 1  # samples per row (always even)
    offsets = torch.cumsum(counts, 0) - counts
    batch["sample_index"] = torch.where(idx >= 0, idx + offsets.unsqueeze(1), idx)
    batch["num_pairs"] = torch.tensor(int(counts.sum()) // 2)
    return batch

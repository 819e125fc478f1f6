"""Prompt records (``--prompt`` / JSONL) -> token ids, with the chat template of the run.

A record is ``{"prompt": str}`` or ``{"messages": [{role, content}, ...]}``
(``question`` is accepted as ``prompt``).  Templates are the names of
:data:`llada_cpt.data.chat.TEMPLATES` (the same for SFT, DPO, RL and here):
``raw`` encodes the prompt text verbatim (continuation of pre-training text);
``auto`` / ``plain`` / ``chatml`` / ``tokenizer`` wrap it as a user turn followed
by the assistant generation prompt (:func:`llada_cpt.data.chat.generation_prompt_ids`),
exactly as SFT tokenized the prompt part.  The default depends on the
checkpoint: a CPT model continues text (``raw``), post-trained ones get ``auto``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

from ..data.chat import TEMPLATES
from ..errors import DataError

__all__ = ["CHAT_TEMPLATES", "default_template", "read_records", "encode_record"]

CHAT_TEMPLATES = TEMPLATES


def default_template(stage: str) -> str:
    return "raw" if stage == "cpt" else "auto"


def read_records(path: str | Path, required: tuple = ()) -> List[dict]:
    """JSON objects of a JSONL file; one :class:`DataError` naming the first bad line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"input file `{p}` does not exist; pass a JSONL file with one object per line")
    records = []
    try:
        lines = p.read_text(encoding="utf-8").split("\n")  # (not splitlines: JSON text may hold U+2028)
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"input file `{p}` cannot be read ({err}); pass a UTF-8 JSONL file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{p}:{n}: not valid JSON ({err.msg}); write one JSON object per line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{n}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise DataError(f"{p}:{n}: missing field(s) {', '.join(repr(k) for k in missing)}")
        rec["_line"] = n
        records.append(rec)
    if not records:
        raise DataError(f"input file `{p}` holds no records")
    return records


def encode_record(record: dict, tokenizer: Any, template: str, where: Optional[str] = None) -> List[int]:
    """Token ids the sampler continues from; ``where`` names the record in errors."""
    from ..data.chat import generation_prompt_ids

    where = where or "prompt"
    if template not in CHAT_TEMPLATES:
        raise DataError(f"unknown chat template `{template}`; use one of {', '.join(CHAT_TEMPLATES)}")
    messages = record.get("messages")
    text = record.get("prompt", record.get("question"))
    if messages is None and not isinstance(text, str):
        raise DataError(f"{where}: needs a string 'prompt' (or 'question') or a 'messages' list")
    try:
        if messages is not None:
            if template == "raw":
                raise DataError(f"{where}: 'messages' need a chat template; pass --chat-template auto, plain or chatml")
            return generation_prompt_ids(messages, tokenizer, template)
        if template == "raw":
            return list(tokenizer.encode(text))
        return generation_prompt_ids([{"role": "user", "content": text}], tokenizer, template)
    except DataError:
        raise
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None

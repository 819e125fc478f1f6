#!/usr/bin/env python
"""Write the bundled SFT / DPO demo sets from the Python standard library's own text.

Every record is derived from a pure-Python stdlib function: its docstring summary
and its signature.  SFT asks for the signature given the summary (``{prompt,
response}``) or, as a two-turn chat (``{messages}``), for the summary and then the
signature; DPO prefers the true signature over a neighbouring function's (or a
shortened one).  The output is deterministic for a given Python version (the
committed files were made with CPython 3.11); texts are short so that the tiny
demo model (seq_length 256) fits every sample.

    python scripts/make_demo_post_training_data.py [--out llada_cpt/data/bundled]
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import warnings
from typing import Iterator, List, NamedTuple

MODULES = (
    "base64", "bisect", "calendar", "colorsys", "difflib", "fnmatch", "ftplib", "glob", "gzip", "heapq",
    "html", "json", "keyword", "mimetypes", "ntpath", "os.path", "pprint", "quopri", "random", "shlex",
    "shutil", "statistics", "string", "tempfile", "textwrap", "tokenize", "urllib.parse", "uu", "wave",
)
MAX_SIGNATURE = 70
MAX_SUMMARY = 110
SYSTEM = "You are a concise assistant for the Python standard library."


class Entry(NamedTuple):
    module: str
    name: str
    signature: str
    summary: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def _summary(doc: str) -> str:
    """First paragraph of a docstring on one line, if it reads as a sentence."""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    return first if first.endswith(".") and len(first) <= MAX_SUMMARY else ""


def stdlib_entries() -> List[Entry]:
    """Public pure-Python functions with a short summary and a stable short signature."""
    entries = []
    for mod_name in MODULES:
        try:
            with warnings.catch_warnings():  # uu and friends are deprecated, still fine to read
                warnings.simplefilter("ignore", DeprecationWarning)
                mod = importlib.import_module(mod_name)
        except ImportError:  # removed in a later Python (uu); the set just gets smaller
            continue
        for name, fn in sorted(vars(mod).items()):
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != mod.__name__:
                continue
            try:
                sig = str(inspect.signature(fn))
            except (TypeError, ValueError):
                continue
            summary = _summary(inspect.getdoc(fn) or "")
            if summary and len(sig) <= MAX_SIGNATURE and " at 0x" not in sig:
                entries.append(Entry(mod_name, name, sig, summary))
    return entries


def sft_records(entries: List[Entry]) -> Iterator[dict]:
    for i, e in enumerate(entries):
        if i % 3 == 2:
            turns = [
                {"role": "user", "content": f"What does {e.qualname} do?"},
                {"role": "assistant", "content": e.summary},
                {"role": "user", "content": "What is its signature?"},
                {"role": "assistant", "content": f"{e.qualname}{e.signature}"},
            ]
            yield {"messages": ([{"role": "system", "content": SYSTEM}] if i % 2 else []) + turns}
        else:
            yield {
                "prompt": f"Which {e.module} function does this: {e.summary} Give its signature.",
                "response": f"{e.qualname}{e.signature}",
            }


def _wrong_signature(e: Entry, neighbours: List[Entry]) -> str:
    """A neighbour's different signature, else the true one without its last parameter."""
    for other in neighbours:
        if other.signature != e.signature:
            return other.signature
    params = e.signature[1:].split(")")[0].split(", ")
    return "(" + ", ".join(params[:-1]) + ")" + e.signature.split(")", 1)[1]


def dpo_records(entries: List[Entry]) -> Iterator[dict]:
    for i, e in enumerate(entries):
        if i % 2:
            continue
        same_module = [o for o in entries[i + 1:] + entries[:i] if o.module == e.module]
        chosen = f"{e.qualname}{e.signature}"
        rejected = f"{e.qualname}{_wrong_signature(e, same_module)}"
        if chosen == rejected:
            continue
        question = f"What is the signature of {e.qualname}?"
        if i % 6 == 4:
            yield {"messages": [{"role": "user", "content": question}],
                   "chosen": {"role": "assistant", "content": chosen},
                   "rejected": {"role": "assistant", "content": rejected}}
        else:
            yield {"prompt": question, "chosen": chosen, "rejected": rejected}


def write_jsonl(path: str, records: Iterator[dict]) -> int:
    tmp = path + ".tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    os.replace(tmp, path)  # never leave a partial file behind
    return n


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "llada_cpt", "data", "bundled"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    entries = stdlib_entries()
    n_sft = write_jsonl(os.path.join(args.out, "sft_demo.jsonl"), sft_records(entries))
    n_dpo = write_jsonl(os.path.join(args.out, "dpo_demo.jsonl"), dpo_records(entries))
    print(f"{len(entries)} stdlib functions -> {n_sft} SFT records, {n_dpo} DPO pairs in {args.out}")


if __name__ == "__main__":
    main()

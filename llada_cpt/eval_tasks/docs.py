"""Document loaders of the shipped tasks (``custom_dataset: !function docs.<name>`` in the YAML files).

The harness calls them with the run's metadata (the model arguments) as keyword
arguments, which they ignore.  Each returns ``{"test": datasets.Dataset}``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "bundled"
CHOICES = 4


def _records(name: str) -> List[dict]:
    with open(BUNDLED / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(rows: List[dict]) -> Dict[str, "datasets.Dataset"]:  # noqa: F821
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def arithmetic(**_metadata) -> Dict[str, "datasets.Dataset"]:  # noqa: F821
    """``{question, answer}`` of ``arithmetic_rl.jsonl``."""
    return _dataset([{"question": r["question"], "answer": r["ground_truth_answer"]}
                     for r in _records("arithmetic_rl.jsonl")])


def arithmetic_choices(**_metadata) -> Dict[str, "datasets.Dataset"]:  # noqa: F821
    """``{question, choices, label}``: the answer among the next distinct answers of the file, at ``i % 4``."""
    recs = _records("arithmetic_rl.jsonl")
    answers = [r["ground_truth_answer"] for r in recs]
    rows = []
    for i, r in enumerate(recs):
        wrong: List[str] = []
        j = i + 1
        while len(wrong) < CHOICES - 1:
            a = answers[j % len(answers)]
            if a != answers[i] and a not in wrong:
                wrong.append(a)
            j += 1
        label = i % CHOICES
        rows.append({"question": r["question"], "choices": wrong[:label] + [answers[i]] + wrong[label:],
                     "label": label})
    return _dataset(rows)


def responses(**_metadata) -> Dict[str, "datasets.Dataset"]:  # noqa: F821
    """``{text}``: the responses of ``sft_demo.jsonl`` (plain documents for perplexity)."""
    rows = []
    for r in _records("sft_demo.jsonl"):
        text = r.get("response") or next((m["content"] for m in reversed(r.get("messages", []))
                                          if m.get("role") == "assistant"), "")
        if text:
            rows.append({"text": text})
    return _dataset(rows)

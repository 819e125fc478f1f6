"""A model that generation can be judged on after ~1-2 CPU minutes of real training.

The demo model (``configs/tiny_cpu.yaml`` on the Python stdlib corpus) trained
for a few hundred CPU steps stays near the unigram distribution (validation
perplexity ~140-200): its confidence on masked positions never exceeds ~0.1,
so every threshold from 0.3 to 0.95 decodes one token per step and TPF does
not move.  Here the same recipe (``llada-cpt train -c configs/tiny_cpu.yaml
--nproc 2``, tiny preset, WSD block schedule) trains on a small corpus of three
Python snippets repeated as documents, with a SentencePiece tokenizer trained
on it: in ~120 steps the model learns them well enough to be confident on most
positions and unsure on some, which is what threshold decoding needs.

Used by ``tests/test_generate_cli.py`` and ``benchmarks/generate.py``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from run_helpers import REPO, TINY_CONFIG, cli, run

SNIPPETS = (
    'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n',
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "import os\nimport sys\n\ndef main(argv):\n    for name in argv:\n"
    "        print(os.path.basename(name))\n    return 0\n",
)
# prompts that start a snippet: the continuation is learned text
PROMPTS = ("class Stack:\n    def __init__(self):", "import os\nimport sys")


def build_corpus(root: Path, documents: int = 300, vocab_size: int = 400) -> tuple[str, str]:
    """Tokenizer and indexed dataset of the snippets; returns ``(tokenizer_path, prefix)``."""
    from llada_cpt.data.preprocess import preprocess_texts
    from llada_cpt.data.tokenizer import train_sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    tok_path = root / "toy.model"
    tok = train_sentencepiece(list(SNIPPETS) * 20, tok_path, vocab_size)
    prefix = root / "toy"
    preprocess_texts(((f"doc{i}", SNIPPETS[i % len(SNIPPETS)]) for i in range(documents)), tok, prefix)
    return str(tok_path), str(prefix)


def train_toy_model(root: Path, steps: int = 120, seq_length: int = 64,
                    block_schedule: Sequence[Sequence[int]] = ((4, 30), (16, 1000)), timeout: float = 900) -> Path:
    """Train with the CLI (2 ranks) into ``root/run``; returns the run directory."""
    tok, prefix = build_corpus(root / "data")
    run_dir = root / "run"
    schedule = json.dumps([list(p) for p in block_schedule]).replace(" ", "")
    args = [
        "train", "-c", str(TINY_CONFIG), "--nproc", "2", f"checkpoint.save_dir={run_dir}",
        "data.demo=false", f"data.train_data=[{prefix}]", f"data.valid_data=[{prefix}]", f"data.tokenizer={tok}",
        f"data.seq_length={seq_length}", f"diffusion.block_schedule={schedule}", "diffusion.reference_block_size=null",
        f"train.train_steps={steps}", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.lr=3e-3", "train.lr_warmup_steps=10", "diffusion.embedding_noise_steps=0",
        "logging.eval_interval=0", "logging.log_interval=30", "logging.eval_iters=1", "checkpoint.save_interval=0",
    ]
    proc = run(cli(*args), cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"toy model training failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return run_dir

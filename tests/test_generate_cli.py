"""``llada-cpt generate`` / ``llada-cpt eval`` end to end on a model trained by ``llada-cpt train`` here.

The model (``toy_generation_model``: the tiny demo recipe, 2 ranks, ~120 steps on
a small memorisable corpus) is trained once per session; every command runs as a
real subprocess, like a user would start it.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from run_helpers import REPO, cli, run
from toy_generation_model import PROMPTS, SNIPPETS, train_toy_model

STATS = re.compile(r"forward passes (\d+) \| TPF ([0-9.]+) \| ([0-9.]+) tokens/s")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return train_toy_model(tmp_path_factory.mktemp("toy_generation"))


def _generate(run_dir: Path, *extra: str, timeout: float = 300):
    args = ["generate", "--ckpt", str(run_dir), "--max-new-tokens", "48", "--quiet"]
    for p in PROMPTS:
        args += ["--prompt", p]
    return run(cli(*args, *extra), cwd=REPO, timeout=timeout)


def _stats(stdout: str) -> tuple[int, float, float]:
    m = STATS.search(stdout)
    assert m, stdout[-2000:]
    return int(m.group(1)), float(m.group(2)), float(m.group(3))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def greedy_095(run_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gen") / "out.jsonl"
    proc = _generate(run_dir, "--threshold", "0.95", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"proc": proc, "rows": _read_jsonl(out)}


def test_generate_writes_text_ids_step_map_and_stats(greedy_095, run_dir):
    proc, rows = greedy_095["proc"], greedy_095["rows"]
    assert "WARNING" not in proc.stderr  # default block size = the trained one
    forwards, tpf, tps = _stats(proc.stdout)
    assert forwards > 0 and tpf >= 1.0 and tps > 0
    assert len(rows) == len(PROMPTS)
    for prompt, row in zip(PROMPTS, rows):
        assert row["prompt"] == prompt
        assert len(row["ids"]) == len(row["step_map"]) > 0 and min(row["step_map"]) >= 0
        assert row["finish_reason"] in ("eos", "length")
        assert row["stats"]["tokens"] == len(row["ids"]) and row["stats"]["steps"] == len(set(row["step_map"]))
        assert row["text"].strip()
    # the trained model continues its snippet
    assert rows[0]["text"].strip().startswith("self.items = []")
    assert any(s.startswith(PROMPTS[0]) for s in SNIPPETS)


def test_lower_threshold_decodes_more_tokens_per_forward(greedy_095, run_dir):
    _, tpf_095, _ = _stats(greedy_095["proc"].stdout)
    proc = _generate(run_dir, "--threshold", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    forwards, tpf_05, _ = _stats(proc.stdout)
    assert tpf_05 > tpf_095
    assert forwards < sum(r["stats"]["steps"] for r in greedy_095["rows"])


def test_tensor_parallel_generation_matches_single_rank(greedy_095, run_dir, tmp_path):
    out = tmp_path / "tp2.jsonl"
    proc = _generate(run_dir, "--threshold", "0.95", "--nproc", "2", "--tp", "2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_jsonl(out)
    assert [r["ids"] for r in rows] == [r["ids"] for r in greedy_095["rows"]]
    assert [r["step_map"] for r in rows] == [r["step_map"] for r in greedy_095["rows"]]
    assert len(STATS.findall(proc.stdout)) == 1  # one report, from rank 0


def test_eval_reproduces_the_logged_validation_loss(run_dir):
    metrics = json.loads((sorted(run_dir.glob("iter_*"))[-1] / "metrics.json").read_text())
    proc = run(cli("eval", "--ckpt", str(run_dir), "--max-samples", "8"), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"validation loss ([0-9.]+) \| perplexity ([0-9.]+) \| block size (\d+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    loss, ppl, block = float(m.group(1)), float(m.group(2)), int(m.group(3))
    assert block == metrics["val_block_size"] == 16
    # the training loop evaluated the same 8 sequences with the same noise (salt `valid`)
    assert loss == pytest.approx(metrics["val_loss"], abs=1e-4)
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)


def test_eval_math_scores_boxed_answers(run_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question": "What is 1 + 1?", "ground_truth_answer": "2"},
        {"question": "What is 2 + 3?", "ground_truth_answer": "5"}]) + "\n")
    out = tmp_path / "preds.jsonl"
    proc = run(cli("eval", "--ckpt", str(run_dir), "--math", str(questions), "--max-new-tokens", "16",
                   "--threshold", "0.9", "--quiet", "--output", str(out)), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"math accuracy (\d+)/2 = ([0-9.]+)%", proc.stdout)
    assert m, proc.stdout[-2000:]
    rows = _read_jsonl(out)
    assert [r["ground_truth_answer"] for r in rows] == ["2", "5"]
    assert int(m.group(1)) == sum(r["correct"] for r in rows)  # the toy model writes code, not boxed answers
    _stats(proc.stdout)


# ------------------------------------------------------------------------------ bad inputs
# These fail before any model is built, so they run in this process (no Megatron set-up happens).


def _main(capsys, *args) -> tuple[int, str]:
    from llada_cpt.cli import main

    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def _error_line(code: int, err: str, command: str) -> str:
    assert code == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"llada-cpt {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_missing_checkpoint_is_one_clear_error(tmp_path, capsys):
    line = _error_line(*_main(capsys, "generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "x"), "generate")
    assert "does not exist" in line and "run directory" in line
    line = _error_line(*_main(capsys, "eval", "--ckpt", str(tmp_path), "--max-samples", "8"), "eval")
    assert "holds no checkpoint" in line


def test_prompt_longer_than_the_context_is_refused_before_loading(run_dir, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    long_prompt = "x = 1\n" * 3000  # max_position_embeddings of the tiny preset is 4096
    code, err = _main(capsys, "generate", "--ckpt", str(run_dir), "--prompt", "def f():", "--prompt", long_prompt,
                      "--block-size", "8", "--output", str(out))
    line = _error_line(code, err, "generate")
    assert "prompt 1 has" in line and "context is 4096" in line
    assert not out.exists()  # no partial output
    # a block size other than the trained one is a warning naming the trained value, not an error
    warnings = [ln for ln in err.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == 1 and "block size 8" in warnings[0] and "trained block size 16" in warnings[0]


def test_bad_inputs_are_named(run_dir, tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"prompt": "def f():"}\n{"prompt": 3}\n')
    line = _error_line(*_main(capsys, "generate", "--ckpt", str(run_dir), "--input", str(bad)), "generate")
    assert f"{bad}:2" in line and "prompt" in line
    line = _error_line(*_main(capsys, "eval", "--ckpt", str(run_dir), "--math", str(bad)), "eval")
    assert f"{bad}:1" in line and "question" in line
    line = _error_line(*_main(capsys, "generate", "--ckpt", str(run_dir), "--prompt", "x", "--tp", "2"), "generate")
    assert "--nproc 2" in line

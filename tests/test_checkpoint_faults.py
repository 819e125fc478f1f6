"""Damaged checkpoints and full disks.

* ``llada-cpt checkpoint verify`` finds each kind of damage from the files alone (no model);
* training verifies the checkpoint it resumes from (or starts from) first: a truncated shard is one
  line naming the checkpoint and the previous complete one, and following that advice resumes;
* ``merge``, ``convert import`` / ``export`` and ``preprocess`` that run out of space (``RLIMIT_FSIZE``:
  EFBIG, what ENOSPC is on a full disk) stop with one line and leave no partial output.

The training save that hits a full disk is in ``test_reliability.py`` (it compares with the unbroken run).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from run_helpers import TINY_CONFIG, TINY_RUN, assert_clean_error, cli, file_size_limited, latest_name, run

pytestmark = pytest.mark.timeout(600)

SHARD = "__0_0.distcp"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-rank demo run with checkpoints at steps 2 and 4 (tests damage copies of it)."""
    tmp = tmp_path_factory.mktemp("run")
    proc = run(cli("train", "-c", str(TINY_CONFIG), "--nproc", "2", f"checkpoint.save_dir={tmp / 'ck'}",
                   "train.train_steps=4", "checkpoint.save_interval=2", *TINY_RUN), cwd=tmp, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest_name(tmp / "ck") == "iter_0000004"
    return tmp / "ck"


@pytest.fixture
def copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(run_dir, dst)
    return dst


def _truncate(path: Path, keep: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


# ------------------------------------------------------------------------------------ checkpoint verify
def test_verify_a_complete_run(run_dir, tmp_path):
    proc = run(cli("checkpoint", "verify", str(run_dir)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for it in (2, 4):
        assert f"{run_dir / f'iter_{it:07d}'}: ok (model, optimizer, metrics, config, rng x2; resumable)" in lines
    assert f"{run_dir / 'latest'}: iter_0000004 (complete)" in lines


DAMAGE = {
    "truncated shard": (lambda d: _truncate(d / SHARD), f"file {SHARD}: unexpected end of data (1000 of "),
    "missing shard": (lambda d: (d / SHARD).unlink(), f"file {SHARD} is missing"),
    "missing DCP metadata": (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    "garbage DCP metadata": (lambda d: (d / ".metadata").write_bytes(b"\x80\x04garbage"), ".metadata cannot be read"),
    "missing RNG file": (lambda d: (d / "rng" / "rank_00001.pt").unlink(), "rng/rank_00001.pt is missing (1 of 2"),
    "truncated RNG file": (lambda d: _truncate(d / "rng" / "rank_00000.pt", 100), "rng/rank_00000.pt is damaged"),
    "truncated common.pt": (lambda d: _truncate(d / "common.pt", 100), "common.pt is damaged"),
    "missing metrics": (lambda d: (d / "metrics.json").unlink(), "metrics.json is missing"),
    "damaged config": (lambda d: (d / "config.yaml").write_text("model: [unclosed"), "config.yaml is damaged"),
    "missing Megatron metadata": (lambda d: (d / "metadata.json").unlink(), "metadata.json is missing"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_names_each_kind_of_damage(copy, kind):
    from llada_cpt.checkpoint.verify import verify_checkpoint, verify_run

    damage, needle = DAMAGE[kind]
    damage(copy / "iter_0000004")
    verdict = verify_checkpoint(copy / "iter_0000004")
    assert not verdict.ok and any(needle in p for p in verdict.problems), verdict.problems
    assert verify_checkpoint(copy / "iter_0000002").ok
    report = verify_run(copy)
    assert not report.ok and f"{copy / 'latest'}: names iter_0000004, which is CORRUPT" in report.lines()


def test_a_shard_longer_than_its_metadata_is_not_damage(copy):
    """A writer may pad or append a trailer after the items it lists; only a short file is truncation."""
    from llada_cpt.checkpoint.verify import verify_checkpoint

    with open(copy / "iter_0000004" / SHARD, "ab") as f:
        f.write(b"\0" * 4096)
    assert verify_checkpoint(copy / "iter_0000004").ok


def test_require_complete_verifies_once_per_process(copy, monkeypatch):
    """A resume verifies in the loop, check_vocab and load_checkpoint: the files are read once per rank."""
    from llada_cpt.checkpoint import verify

    calls = []
    real = verify.verify_checkpoint
    monkeypatch.setattr(verify, "verify_checkpoint", lambda p, **kw: calls.append(p) or real(p, **kw))
    monkeypatch.setattr(verify, "_VERIFIED", set())
    for _ in range(3):
        verify.require_complete(copy / "iter_0000004", resume=True)
    assert len(calls) == 1
    _truncate(copy / "iter_0000002" / SHARD)  # a failed verification is not remembered
    for _ in range(2):
        with pytest.raises(verify.CheckpointError, match="unexpected end of data"):
            verify.require_complete(copy / "iter_0000002", resume=True)
    assert len(calls) == 3


def test_verify_command_exit_codes(copy, tmp_path):
    _truncate(copy / "iter_0000002" / SHARD)
    (copy / "iter_0000006.tmp").mkdir()  # a save that was killed: reported, not a failure
    proc = run(cli("checkpoint", "verify", str(copy), str(copy / "iter_0000004")), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    corrupt = f"{copy / 'iter_0000002'}: CORRUPT - file {SHARD}: unexpected end of data"
    assert any(ln.startswith(corrupt) for ln in lines)
    assert f"{copy / 'iter_0000006.tmp'}: partial save, ignored (safe to delete)" in lines
    assert f"{copy / 'latest'}: iter_0000004 (complete)" in lines
    assert lines.count(f"{copy / 'iter_0000004'}: ok (model, optimizer, metrics, config, rng x2; resumable)") == 2
    proc = run(cli("checkpoint", "verify", str(tmp_path / "nothing")), cwd=tmp_path)
    assert_clean_error(proc, "checkpoint", "nothing", "does not exist")


def test_verify_a_merged_checkpoint_is_weights_only(run_dir, tmp_path):
    proc = run(cli("merge", "--run-dir", str(run_dir), "--top-k", "2", "--out", str(tmp_path / "merged"),
                   "--no-progress"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(cli("checkpoint", "verify", str(tmp_path / "merged")), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "ok (model, metrics, config; weights only" in proc.stdout


# ------------------------------------------------------------------------------------ resume / start from damage
def _train(save_dir: Path, nproc: int, *extra: str) -> list:
    return cli("train", "-c", str(TINY_CONFIG), "--nproc", str(nproc), f"checkpoint.save_dir={save_dir}",
               "train.train_steps=6", "checkpoint.save_interval=2", *TINY_RUN, *extra)


def test_resume_from_a_truncated_shard_is_one_line_and_the_advice_works(copy, tmp_path):
    """Issue 19's case: before, EOFError tracebacks from both ranks and nothing named the checkpoint."""
    _truncate(copy / "iter_0000004" / SHARD)
    proc = run(_train(copy, 2), cwd=tmp_path, timeout=300)
    line = assert_clean_error(proc, "train", f"checkpoint {copy / 'iter_0000004'} is incomplete or corrupt",
                              f"file {SHARD}: unexpected end of data",
                              f"delete {copy / 'iter_0000004'} and write `iter_0000002` into {copy / 'latest'}")
    assert "Traceback" not in line
    assert latest_name(copy) == "iter_0000004" and sorted(p.name for p in copy.glob("iter_*")) == \
        ["iter_0000002", "iter_0000004"]
    # the advice
    shutil.rmtree(copy / "iter_0000004")
    (copy / "latest").write_text("iter_0000002\n")
    proc = run(_train(copy, 2), cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {copy / 'iter_0000002'} at step 2" in proc.stdout
    assert latest_name(copy) == "iter_0000006"


def test_resume_from_damaged_metadata_is_one_line(copy, tmp_path):
    (copy / "iter_0000004" / ".metadata").write_bytes(b"not a pickle")
    proc = run(_train(copy, 1), cwd=tmp_path, timeout=300)
    assert_clean_error(proc, "train", f"checkpoint {copy / 'iter_0000004'} is incomplete or corrupt",
                       ".metadata cannot be read")
    assert latest_name(copy) == "iter_0000004"


def test_resume_from_a_shard_with_damaged_content_is_one_line(copy, tmp_path):
    """Sizes right, bytes wrong: verification passes, the load fails; still one line naming the checkpoint."""
    with open(copy / "iter_0000004" / SHARD, "r+b") as f:
        f.write(b"\0" * 200_000)
    proc = run(_train(copy, 1), cwd=tmp_path, timeout=300)
    assert_clean_error(proc, "train", f"cannot load checkpoint {copy / 'iter_0000004'}", "content is damaged",
                       "write `iter_0000002` into")


def test_init_from_a_damaged_checkpoint_is_one_line(copy, tmp_path):
    (copy / "iter_0000002" / "rng" / "rank_00001.pt").unlink()
    _truncate(copy / "iter_0000002" / SHARD)
    proc = run(_train(tmp_path / "new", 1, f"train.init_from={copy / 'iter_0000002'}"), cwd=tmp_path, timeout=300)
    assert_clean_error(proc, "train", f"checkpoint {copy / 'iter_0000002'} is incomplete or corrupt",
                       "unexpected end of data")
    assert not (tmp_path / "new").exists()


def test_resume_from_a_weights_only_checkpoint_says_init_from(run_dir, tmp_path):
    proc = run(cli("merge", "--run-dir", str(run_dir), "--top-k", "1", "--out", str(tmp_path / "merged"),
                   "--no-progress"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(_train(tmp_path / "merged", 1), cwd=tmp_path, timeout=300)
    assert_clean_error(proc, "train", "cannot be resumed", "weights only", "train.init_from=")


def test_merge_of_a_damaged_checkpoint_is_one_line(copy, tmp_path):
    _truncate(copy / "iter_0000002" / SHARD)
    proc = run(cli("merge", "--run-dir", str(copy), "--top-k", "2", "--out", str(tmp_path / "merged")), cwd=tmp_path)
    assert_clean_error(proc, "merge", f"checkpoint {copy / 'iter_0000002'} is incomplete or corrupt",
                       "unexpected end of data", "checkpoint verify")
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------------ full disk: offline tools
def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(name) or p.name.startswith(f".{name}")]


def test_merge_on_a_full_disk(run_dir, tmp_path):
    proc = run(file_size_limited(cli("merge", "--run-dir", str(run_dir), "--top-k", "2", "--out",
                                     str(tmp_path / "merged"), "--no-progress"), 1 << 20), cwd=tmp_path)
    assert_clean_error(proc, "merge", f"disk full while writing the merged checkpoint in {tmp_path}",
                       f"nothing was written to {tmp_path / 'merged'}", "free space")
    _no_leftovers(tmp_path, "merged")


def test_convert_export_on_a_full_disk(run_dir, tmp_path):
    ckpt = tmp_path / "run" / "iter_0000004"
    shutil.copytree(run_dir / ckpt.name, ckpt)
    config = ckpt / "config.yaml"  # export needs the vocabulary size; the demo takes it from the tokenizer
    config.write_text(config.read_text().replace("  vocab_size: null", "  vocab_size: 4096"))
    out = tmp_path / "export"
    out.mkdir()
    proc = run(file_size_limited(cli("convert", "export", "--ckpt", str(ckpt), "--out", str(out / "hf")), 1 << 20),
               cwd=tmp_path)
    assert_clean_error(proc, "convert", f"disk full while writing the Hugging Face model in {out}",
                       f"nothing was written to {out / 'hf'}")
    _no_leftovers(out, "hf")


def test_convert_import_on_a_full_disk(tmp_path):
    from test_convert import _hf_model

    _hf_model("qwen3", tmp_path / "qwen3")
    proc = run(file_size_limited(cli("convert", "import", "--hf", str(tmp_path / "qwen3"), "--out",
                                     str(tmp_path / "conv")), 50_000), cwd=tmp_path)
    assert_clean_error(proc, "convert", f"disk full while writing the converted checkpoint in {tmp_path}",
                       f"nothing was written to {tmp_path / 'conv'}")
    _no_leftovers(tmp_path, "conv")


def test_preprocess_on_a_full_disk(tmp_path):
    from llada_cpt.data.demo_corpus import ensure_demo_data

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 20}) + "\n"
                              for i in range(400)))
    proc = run(file_size_limited(cli("preprocess", "--input", str(corpus), "--tokenizer",
                                     str(ensure_demo_data(None).tokenizer_path), "--output-prefix",
                                     str(tmp_path / "out" / "ds"), "--quiet", "--workers", "1"), 20_000), cwd=tmp_path)
    assert_clean_error(proc, "preprocess", "disk full while writing the dataset", "nothing was written")
    assert not list((tmp_path / "out").iterdir())

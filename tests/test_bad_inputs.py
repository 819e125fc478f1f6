"""Bad configs and data across the CLIs: one clear error line, exit code 2, no traceback, no partial output.

Each case runs the real ``llada-cpt`` process.  Some errors are found before any
rank starts (config validation), others inside the ranks of ``--nproc 2`` or of
the launcher that launch/*.sh use: those must reach the user as the same single
line (the launcher prints it once), not as two ranks' messages plus torchrun's report.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Callable, List, NamedTuple

import pytest

from run_helpers import TINY_CONFIG, assert_clean_error, cli, run

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo():
    """The embedded demo's tokenizer and datasets (the shared cache; built on first use)."""
    from llada_cpt.data.demo_corpus import ensure_demo_data

    return ensure_demo_data(None)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory, demo):
    """A SentencePiece model with a much smaller vocabulary than the demo data was tokenized with."""
    from llada_cpt.data.demo_corpus import demo_documents
    from llada_cpt.data.tokenizer import train_sentencepiece

    path = tmp_path_factory.mktemp("tok") / "small.model"
    tok = train_sentencepiece((text for _, text in demo_documents(300_000)), path, vocab_size=512, num_threads=1)
    assert tok.vocab_size < demo.vocab_size
    return path


class Case(NamedTuple):
    name: str
    argv: Callable  # (tmp, demo, small_tokenizer) -> argv list
    command: str  # `llada-cpt <command>: error:` prefix
    needles: tuple  # substrings of the error line
    outputs: Callable = lambda tmp: [tmp / "ck"]  # paths that must not exist afterwards


def train(tmp: Path, *args: str) -> List[str]:
    return cli("train", "-c", str(TINY_CONFIG), "train.train_steps=1", f"checkpoint.save_dir={tmp / 'ck'}", *args)


def corpus_file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


def preprocess(tmp: Path, inputs: List[str], tokenizer: str) -> List[str]:
    return cli("preprocess", "--input", *inputs, "--tokenizer", tokenizer, "--output-prefix",
               str(tmp / "out" / "ds"), "--quiet", "--workers", "1")


def preprocess_outputs(tmp: Path) -> List[Path]:
    return [tmp / "out" / f"ds{ext}" for ext in (".bin", ".idx", ".meta.json")]


CASES = [
    # --- found before any rank starts
    Case("config file missing", lambda t, d, s: train(t, "-c", str(t / "nope.yaml")), "train",
         ("config file", "nope.yaml", "does not exist")),
    Case("unknown config key", lambda t, d, s: train(t, "model.num_layer=2"), "train",
         ("unknown config key `model.num_layer`", "Did you mean `model.num_layers`")),
    Case("block size does not divide seq length", lambda t, d, s: train(t, "diffusion.block_schedule=[[3,10]]"),
         "train", ("block size 3 does not divide data.seq_length=128",)),
    Case("parallel sizes vs --nproc",
         lambda t, d, s: train(t, "--nproc", "2", "parallel.pipeline_model_parallel_size=4"),
         "train", ("2 processes cannot be split", "pipeline(4)")),
    # --- found inside the ranks of `--nproc N` (N=1 where one rank shows the path: cheaper)
    Case("tokenizer missing",
         lambda t, d, s: train(t, "--nproc", "2", "data.demo=false", f"data.tokenizer={t / 'no.model'}",
                               f"data.train_data=[{d.train_prefix}]"),
         "train", ("tokenizer file", "no.model", "does not exist")),
    Case("data prefix missing",
         lambda t, d, s: train(t, "--nproc", "1", "data.demo=false", f"data.tokenizer={d.tokenizer_path}",
                               f"data.train_data=[{t / 'nodata'}]"),
         "train", ("nodata", "not found")),
    Case("init_from checkpoint missing", lambda t, d, s: train(t, "--nproc", "1", f"train.init_from={t / 'nockpt'}"),
         "train", ("checkpoint", "nockpt", "does not exist")),
    Case("tokenizer smaller than the data's vocabulary",
         lambda t, d, s: train(t, "--nproc", "1", "data.demo=false", f"data.tokenizer={s}",
                               f"data.train_data=[{d.train_prefix}]", f"data.valid_data=[{d.valid_prefix}]"),
         "train", (f"vocabulary of {4096}", "preprocess with this tokenizer")),
    # --- inside the ranks of the launcher used by launch/torchrun.sh and launch/slurm.sbatch
    Case("parallel sizes vs ranks (launcher)",
         lambda t, d, s: [sys.executable, "-m", "llada_cpt.runtime.launch", "--standalone", "--nproc-per-node=2",
                          "-m", "llada_cpt.cli", *train(t, "parallel.pipeline_model_parallel_size=4")[3:]],
         "train", ("2 processes cannot be split", "pipeline(4)")),
    # --- preprocess
    Case("unreadable JSONL",
         lambda t, d, s: preprocess(t, [corpus_file(t, "bad.jsonl", b'{"text": "a\n\xff\xfe{oops\n')],
                                    d.tokenizer_path),
         "preprocess", ("no usable documents, nothing written", "corrupt record", "bad.jsonl:1", "bad.jsonl:2"),
         preprocess_outputs),
    Case("empty dataset", lambda t, d, s: preprocess(t, [corpus_file(t, "empty.jsonl", b"")], d.tokenizer_path),
         "preprocess", ("no usable documents, nothing written", "inputs are empty"), preprocess_outputs),
    Case("preprocess input missing", lambda t, d, s: preprocess(t, [str(t / "none.jsonl")], d.tokenizer_path),
         "preprocess", ("not found", "none.jsonl"), preprocess_outputs),
    Case("preprocess tokenizer missing",
         lambda t, d, s: preprocess(t, [corpus_file(t, "ok.jsonl", b'{"text": "x = 1"}\n')], str(t / "no.model")),
         "preprocess", ("tokenizer file", "no.model", "does not exist"), preprocess_outputs),
    # --- merge
    Case("merge run dir missing",
         lambda t, d, s: cli("merge", "--run-dir", str(t / "norun"), "--top-k", "2", "--out", str(t / "merged")),
         "merge", ("norun", "does not exist"), lambda t: [t / "merged"]),
    # --- numeric ranges (issue 19): config fields are validated before any rank starts, options at parsing;
    #     0 is a value, never "not given"
    Case("negative learning rate", lambda t, d, s: train(t, "--nproc", "2", "train.lr=-1e-3"), "train",
         ("train.lr=-0.001 is out of range", "must be >= 0")),
    Case("--nproc 0", lambda t, d, s: train(t, "--nproc", "0"), "train", ("argument --nproc", "must be >= 1, got 0")),
    Case("min_lr above lr", lambda t, d, s: train(t, "train.lr=1e-4", "train.min_lr=1e-3"), "train",
         ("train.min_lr=0.001 is above train.lr=0.0001",)),
    Case("NaN minimum learning rate", lambda t, d, s: train(t, "train.min_lr=.nan"), "train",
         ("train.min_lr=nan is out of range", "must be >= 0")),
    Case("zero log interval", lambda t, d, s: train(t, "logging.log_interval=0"), "train",
         ("logging.log_interval=0 is out of range", "must be >= 1")),
    Case("negative save interval", lambda t, d, s: train(t, "checkpoint.save_interval=-2"), "train",
         ("checkpoint.save_interval=-2 is out of range", "must be >= 0")),
    Case("zero train steps", lambda t, d, s: train(t, "train.train_steps=0"), "train",
         ("train.train_steps=0 is out of range",)),
    Case("adam beta2 of 1", lambda t, d, s: train(t, "train.adam_beta2=1.0"), "train",
         ("train.adam_beta2=1.0 is out of range", "in [0, 1)")),
    Case("zero WSD decay steps", lambda t, d, s: train(t, "train.lr_decay_style=WSD", "train.lr_wsd_decay_steps=0"),
         "train", ("train.lr_wsd_decay_steps=0 is out of range", "(or unset)")),
    Case("zero-length WSD phase", lambda t, d, s: train(t, "diffusion.block_schedule=[[4,0],[8,1]]"), "train",
         ("diffusion.block_schedule[0]: phase length 0 must be >= 1 steps",)),
    Case("RL top-p and temperature", lambda t, d, s: cli("rl", "-c", "tiny_rl", "rl.top_p=0", "rl.temperature=-1",
                                                         f"checkpoint.save_dir={t / 'ck'}"),
         "rl", ("2 problems in the config",)),
    Case("RL group of one",
         lambda t, d, s: cli("rl", "-c", "tiny_rl", "rl.group_size=1", f"checkpoint.save_dir={t / 'ck'}"),
         "rl", ("rl.group_size=1 is out of range", "must be >= 2")),
    Case("config file that is not text", lambda t, d, s: train(t, "-c", corpus_file(t, "cfg.yaml", b"\xff\xfe\x00bin")),
         "train", ("config file", "cfg.yaml", "cannot be read")),
    Case("generate --block-size 0",
         lambda t, d, s: cli("generate", "--ckpt", str(t), "--prompt", "x", "--block-size", "0"),
         "generate", ("argument --block-size", "must be >= 1, got 0")),
    Case("generate --top-k -1", lambda t, d, s: cli("generate", "--ckpt", str(t), "--prompt", "x", "--top-k", "-1"),
         "generate", ("argument --top-k", "must be >= 0, got -1")),
    Case("generate --top-p 0", lambda t, d, s: cli("generate", "--ckpt", str(t), "--prompt", "x", "--top-p", "0"),
         "generate", ("argument --top-p", "must be in (0, 1], got 0")),
    Case("generate --temperature nan", lambda t, d, s: cli("generate", "--ckpt", str(t), "--prompt", "x",
                                                           "--temperature", "nan"),
         "generate", ("argument --temperature", "got nan")),
    Case("eval --max-samples 0", lambda t, d, s: cli("eval", "--ckpt", str(t), "--max-samples", "0"),
         "eval", ("argument --max-samples", "must be >= 1, got 0")),
    Case("merge --top-k 0",
         lambda t, d, s: cli("merge", "--run-dir", str(t), "--top-k", "0", "--out", str(t / "merged")),
         "merge", ("argument --top-k", "must be >= 1, got 0"), lambda t: [t / "merged"]),
    Case("convert import --tp 0", lambda t, d, s: cli("convert", "import", "--hf", str(t), "--out", str(t / "conv"),
                                                      "--tp", "0"),
         "convert import", ("argument --tp", "must be >= 1, got 0"), lambda t: [t / "conv"]),
    Case("preprocess --workers 0", lambda t, d, s: cli("preprocess", "--input", "x.jsonl", "--tokenizer", "t.model",
                                                       "--output-prefix", str(t / "out" / "ds"), "--workers", "0"),
         "preprocess", ("argument --workers", "must be >= 1, got 0"), preprocess_outputs),
    # --- file readers name the file
    Case("preprocess input that is not gzip",
         lambda t, d, s: preprocess(t, [corpus_file(t, "corpus.jsonl.gz", b'{"text": "x = 1"}\n')], d.tokenizer_path),
         "preprocess", ("corpus.jsonl.gz is not a valid gzip file", "nothing written"), preprocess_outputs),
    Case("preprocess input that is truncated gzip",
         lambda t, d, s: preprocess(t, [corpus_file(t, "cut.txt.gz", gzip.compress(b"x = 1\n" * 1000)[:40])],
                                    d.tokenizer_path),
         "preprocess", ("cut.txt.gz is not a valid gzip file",), preprocess_outputs),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_error_line_and_no_output(case, tmp_path, demo, small_tokenizer):
    proc = run(case.argv(tmp_path, demo, small_tokenizer), cwd=tmp_path, timeout=300)
    assert_clean_error(proc, case.command, *case.needles)
    for path in case.outputs(tmp_path):
        assert not path.exists(), f"{path} was created by a failing run"
    assert not list(tmp_path.rglob("latest")) and not list(tmp_path.rglob("iter_*"))


def test_checkpoint_of_another_vocabulary_is_refused(tmp_path):
    """``CheckpointInfo.check_vocab``: a checkpoint's embedding rows must be this run's vocabulary under its padding."""
    from dist import run_distributed
    from llada_cpt.checkpoint.info import CheckpointInfo
    from llada_cpt.errors import UserError

    run_distributed(_save_embedding_only, 1, str(tmp_path / "iter_0000001"), 4096, 128)
    info = CheckpointInfo.read(tmp_path / "iter_0000001")
    info.check_vocab(4096)
    info.check_vocab(4000)  # same vocabulary up to padding (e.g. another TP size)
    for vocab in (512, 4097, 8192):
        with pytest.raises(UserError, match=rf"embeddings for 4096 tokens .* tokenizer has {vocab} tokens"):
            info.check_vocab(vocab)


def _save_embedding_only(rank: int, world: int, path: str, rows: int, divisible_by: int):
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from llada_cpt import megatron_patches

    megatron_patches.apply()  # CPU: dist_checkpointing would synchronize CUDA
    torch.distributed.init_process_group("gloo")
    Path(path).mkdir(parents=True)
    weight = torch.zeros(rows, 8)
    dist_checkpointing.save({"embedding": ShardedTensor.from_rank_offsets("embedding.word_embeddings.weight", weight)},
                            path)
    (Path(path) / "config.yaml").write_text(json.dumps({"model": {"make_vocab_size_divisible_by": divisible_by},
                                                        "parallel": {"tensor_model_parallel_size": 1}}))


def test_init_from_a_checkpoint_of_another_vocabulary_is_one_error_line(tmp_path, demo):
    """Through the CLI: the demo tokenizer (4096 tokens) against a checkpoint with 8192 embedding rows."""
    from dist import run_distributed

    run_distributed(_save_embedding_only, 1, str(tmp_path / "other" / "iter_0000001"), 8192, 128)
    proc = run(train(tmp_path, "--nproc", "1", f"train.init_from={tmp_path / 'other' / 'iter_0000001'}"),
               cwd=tmp_path, timeout=300)
    assert_clean_error(proc, "train", "embeddings for 8192 tokens", "tokenizer has 4096 tokens")
    assert not (tmp_path / "ck").exists()


# ------------------------------------------------------------------------------------ the range table itself
# numeric fields whose rules are cross-field checks in config/validation.py rather than a plain range
CHECKED_WITH_OTHERS = {
    "model.rope_scaling_factor", "model.rope_low_freq_factor", "model.rope_high_freq_factor",
    "model.rope_original_max_position_embeddings", "model.moe_router_topk", "parallel.tensor_model_parallel_size",
    "parallel.pipeline_model_parallel_size", "parallel.context_parallel_size", "parallel.expert_model_parallel_size",
    "diffusion.mask_ratio_min", "diffusion.mask_ratio_max", "diffusion.reference_block_size", "data.seq_length",
    "train.micro_batch_size", "train.global_batch_size", "sft.valid_fraction", "sft.block_size",
    "dpo.valid_fraction", "dpo.block_size",
}


def _numeric_fields() -> List[str]:
    import dataclasses
    import typing

    from llada_cpt.config.schema import Config

    out, root = [], Config()
    for section in dataclasses.fields(root):
        value = getattr(root, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            kinds = set(typing.get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}
            if kinds and kinds <= {int, float}:
                out.append(f"{section.name}.{f.name}")
    return out


def test_every_numeric_config_field_has_a_range():
    """A new numeric field needs a range in config/ranges.py (or a cross-field rule listed above)."""
    from llada_cpt.config.ranges import RANGES

    ranged = {path for path, _ in RANGES}
    missing = [p for p in _numeric_fields() if p not in ranged and p not in CHECKED_WITH_OTHERS]
    assert not missing, f"numeric config fields without a range: {missing}"


def _outside_and_inside(interval: str) -> tuple:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    outside = [lo if interval[0] == "(" else lo - 1]
    if hi != float("inf"):
        outside.append(hi if interval[-1] == ")" else hi + 0.5)
    inside = lo if interval[0] == "[" else (lo + 0.5 if hi == float("inf") else (lo + hi) / 2)
    return outside + [float("nan")], inside


def test_each_range_is_enforced_at_its_boundary():
    import typing

    from llada_cpt.config import load_config, validate
    from llada_cpt.config.ranges import RANGES
    from llada_cpt.errors import ConfigError

    base = load_config(TINY_CONFIG)
    for path, interval in RANGES:
        section, name = path.split(".")
        hint = typing.get_type_hints(type(getattr(base, section)))[name]
        is_int = int in (typing.get_args(hint) or (hint,))
        outside, inside = _outside_and_inside(interval)
        for value in outside + [inside]:
            if is_int and value != value:  # NaN is not an int
                continue
            cfg = load_config(TINY_CONFIG)
            setattr(getattr(cfg, section), name, int(value) if is_int else value)
            try:
                validate(cfg)
                message = ""
            except ConfigError as err:
                message = str(err)
            complaint = f"{path}={getattr(getattr(cfg, section), name)} is out of range"
            if value is inside:
                assert complaint not in message, (path, value, message)
            else:
                assert complaint in message, (path, value, message)

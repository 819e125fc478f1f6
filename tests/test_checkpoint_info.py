"""CheckpointInfo: the one view of what a checkpoint says about itself (no Megatron, no model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llada_cpt.checkpoint.info import NOT_ARCHITECTURE, CheckpointInfo
from llada_cpt.checkpoint.paths import CheckpointError
from llada_cpt.checkpoint.selection import select_top_k
from llada_cpt.config import dump_config, load_config
from llada_cpt.errors import ConfigError


def _checkpoint(run: Path, iteration: int, config: str | None = None, metrics: str | None = None) -> Path:
    path = run / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    if config is not None:
        (path / "config.yaml").write_text(config)
    if metrics is not None:
        (path / "metrics.json").write_text(metrics)
    (run / "latest").write_text(path.name + "\n")
    return path


def test_metadata_of_a_run_directory_follows_latest(tmp_path):
    cfg = load_config(None, ["data.seq_length=64", "train.global_batch_size=2", "stage=sft",
                             "diffusion.block_schedule=[[1,10],[64,10],[16,5]]"])
    _checkpoint(tmp_path, 5, dump_config(cfg), json.dumps({"iteration": 5}))
    path = _checkpoint(tmp_path, 15, dump_config(cfg), json.dumps({"iteration": 15, "consumed_tokens": 15 * 128}))
    info = CheckpointInfo.read(tmp_path)
    assert info.path == path and info.iteration == 15 and info.consumed_tokens == 15 * 128
    assert info.stage == "sft" and info.config.data.seq_length == 64
    assert info.trained_block_size == 64  # the phase of its last step (step 15 of 1x10, 64x10, 16x5)
    assert info.context_length == cfg.model.max_position_embeddings


def test_what_a_bare_checkpoint_does_not_know(tmp_path):
    """No metrics.json: iteration from the directory name; no config.yaml: no stage, block size, architecture."""
    info = CheckpointInfo.read(_checkpoint(tmp_path, 300))
    assert info.iteration == 300 and info.consumed_tokens is None and info.metrics == {}
    assert info.saved_config is None and info.stage is None and info.trained_block_size is None
    assert info.architecture is None and info.model_differences(load_config(None, []).model) == []
    with pytest.raises(CheckpointError, match=r"has no config.yaml, so its model architecture is unknown"):
        info.config
    # a config that names no stage is the default stage's (a resolved config always names it)
    assert CheckpointInfo.read(_checkpoint(tmp_path / "b", 1, "model: {}\n")).stage == "cpt"


def test_damaged_files_are_one_error_naming_the_file_and_config_is_read_only_when_asked(tmp_path):
    path = _checkpoint(tmp_path, 1, "model: [unclosed", json.dumps({"iteration": 1, "val_ppl": 3.0}))
    info = CheckpointInfo.read(path)  # metrics only: top-k ranking never reads config.yaml
    assert info.iteration == 1
    with pytest.raises(CheckpointError, match=r"config.yaml` is damaged \(\w+Error\); use another checkpoint"):
        info.saved_config
    (path / "config.yaml").write_text("- a list\n- not a config\n")
    with pytest.raises(CheckpointError, match=r"config.yaml` is damaged \(TypeError\)"):
        CheckpointInfo.read(path).saved_config
    (path / "metrics.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"metrics.json` is damaged \(JSONDecodeError\)"):
        CheckpointInfo.read(path)


def test_top_k_skips_a_checkpoint_with_damaged_metrics(tmp_path):
    _checkpoint(tmp_path, 1, metrics="{oops")
    _checkpoint(tmp_path, 2, metrics=json.dumps({"iteration": 2, "val_ppl": 4.0}))
    sel = select_top_k(tmp_path, 1)
    assert [c.iteration for c in sel.chosen] == [2] and sel.weights == [1.0]
    assert [(c.path.name, "metrics.json` is damaged" in why) for c, why in sel.skipped] == [("iter_0000001", True)]


def test_architecture_leaves_out_kernel_and_memory_settings(tmp_path):
    model = load_config(None, ["model.num_layers=2"]).model
    saved = {"model": {"num_layers": 3, "hidden_size": model.hidden_size, "attention_backend": "other",
                       "recompute_granularity": "full", "init_method_std": 1.0}}
    info = CheckpointInfo.read(_checkpoint(tmp_path, 1, yaml.safe_dump(saved)))
    assert set(info.architecture) == {"num_layers", "hidden_size"}
    assert not NOT_ARCHITECTURE & set(info.architecture)
    assert info.model_differences(model) == ["num_layers: 2 vs 3"]
    with pytest.raises(ConfigError, match=r"model section differs .* \(num_layers: 2 vs 3\); use that checkpoint's"):
        info.check_model(model)

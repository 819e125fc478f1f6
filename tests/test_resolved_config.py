"""One set of names and one validated config: chat-template names shared by SFT / DPO / RL / generate, the
``rl`` section validated, and values taken from an ``init_from`` checkpoint resolved *before* validation."""
from __future__ import annotations

import pytest

from llada_cpt.config import load_config, validate
from llada_cpt.errors import ConfigError


def test_one_set_of_chat_template_names_validated_for_every_stage_and_tool():
    from llada_cpt.data.chat import TEMPLATES
    from llada_cpt.inference.prompts import CHAT_TEMPLATES, default_template

    assert tuple(CHAT_TEMPLATES) == tuple(TEMPLATES)
    assert default_template("cpt") in TEMPLATES and default_template("sft") in TEMPLATES
    cfg = load_config(None, ["data.demo=true"])
    assert cfg.rl.chat_template in TEMPLATES
    for stage in ("sft", "dpo", "rl"):  # the loader checks every section, whatever the stage
        with pytest.raises(ConfigError, match=f"{stage}.chat_template `chatlm` is not one of"):
            load_config(None, ["data.demo=true", f"{stage}.chat_template=chatlm"])
        bad = load_config(None, ["data.demo=true"])
        bad.stage = stage
        setattr(getattr(bad, stage), "chat_template", "chatlm")  # changed in code: validate names it too
        if stage == "rl":
            bad.diffusion.block_schedule = [[bad.rl.block_size, 1]]
        with pytest.raises(ConfigError, match=f"{stage}.chat_template `chatlm` is not one of"):
            validate(bad)


def test_rl_dynamic_sampling_criterion_is_validated():
    with pytest.raises(ConfigError, match="rl.dynamic_sampling `std` is not one of accuracy, reward_std, none"):
        load_config(None, ["data.demo=true", "rl.dynamic_sampling=std"])
    assert load_config(None, []).rl.dynamic_sampling == "accuracy"


def test_raw_template_encodes_prompt_text_verbatim_everywhere():
    from llada_cpt.data.chat import generation_prompt_ids
    from llada_cpt.inference.prompts import encode_record

    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

    assert encode_record({"prompt": "ab"}, Tok(), "raw") == [97, 98]
    assert generation_prompt_ids([{"role": "user", "content": "ab"}], Tok(), "raw") == [97, 98]


def _fake_checkpoint(path, stage: str, *overrides: str, iteration: int, consumed_steps: int):
    """An ``iter_*`` directory as the loop writes it: resolved config.yaml + metrics.json (no weights needed)."""
    import json

    from llada_cpt.config import dump_config

    cfg = load_config(None, ["data.demo=true", "data.seq_length=64", "train.global_batch_size=2", *overrides])
    cfg.stage = stage
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    (path / "config.yaml").write_text(dump_config(cfg))
    (path / "metrics.json").write_text(json.dumps({"iteration": iteration, "consumed_tokens": consumed_steps * 128}))
    return path


def _dry_run(capsys, command: str, stage_cls, *overrides: str):
    import yaml

    from llada_cpt.stages.entry import stage_main

    assert stage_main(["--dry-run", "data.demo=true", "data.seq_length=64", *overrides], command, command,
                      stage_cls) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_values_from_init_from_are_resolved_before_validation_and_printed(tmp_path, capsys):
    """``--dry-run`` prints the resolved, validated config - the one the ranks validate and save: the block
    size of a CPT checkpoint stopped mid-schedule (SFT) and the final learning rate of an SFT checkpoint (DPO)."""
    from llada_cpt.checkpoint.info import CheckpointInfo
    from llada_cpt.stages.common import final_lr
    from llada_cpt.stages.dpo import DPOStage
    from llada_cpt.stages.sft import SFTStage

    cpt = _fake_checkpoint(tmp_path / "cpt" / "iter_0000015", "cpt", "diffusion.block_schedule=[[1,10],[64,10],[16,5]]",
                           iteration=15, consumed_steps=15)
    printed = _dry_run(capsys, "sft", SFTStage, f"train.init_from={cpt}")
    assert printed["diffusion"]["block_schedule"] == [[64, 1]]
    sft = _fake_checkpoint(tmp_path / "sft" / "iter_0000005", "sft", "diffusion.block_schedule=[[16,1]]",
                           "train.lr=2e-3", "train.min_lr=1e-4", "train.lr_decay_style=cosine",
                           "train.train_steps=10", "train.lr_warmup_steps=0", iteration=5, consumed_steps=5)
    want = final_lr(CheckpointInfo.read(str(sft)))
    assert 1e-4 < want < 2e-3
    printed = _dry_run(capsys, "dpo", DPOStage, f"train.init_from={sft}", "train.lr=5e-3", "train.min_lr=1e-5")
    assert printed["train"]["lr"] == pytest.approx(want) and printed["train"]["min_lr"] == 1e-5
    assert printed["diffusion"]["block_schedule"] == [[16, 1]]


def test_rl_refuses_masked_embedding_noise():
    cfg = load_config(None, ["data.demo=true", "diffusion.embedding_noise_steps=10",
                             "diffusion.embedding_noise_std=0.1"])
    cfg.stage = "rl"
    cfg.diffusion.block_schedule = [[cfg.rl.block_size, 1]]
    with pytest.raises(ConfigError, match="diffusion.embedding_noise_steps=0"):
        validate(cfg)

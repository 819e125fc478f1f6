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
    for stage in ("sft", "dpo", "rl"):
        bad = load_config(None, ["data.demo=true", f"{stage}.chat_template=chatlm"])
        bad.stage = stage
        if stage == "rl":
            bad.diffusion.block_schedule = [[bad.rl.block_size, 1]]
        with pytest.raises(ConfigError, match=f"{stage}.chat_template `chatlm` is not one of"):
            validate(bad)


def test_rl_dynamic_sampling_criterion_is_validated():
    cfg = load_config(None, ["data.demo=true", "rl.dynamic_sampling=std"])
    cfg.stage = "rl"
    cfg.diffusion.block_schedule = [[cfg.rl.block_size, 1]]
    with pytest.raises(ConfigError, match="rl.dynamic_sampling `std` is not one of accuracy, reward_std, none"):
        validate(cfg)
    assert load_config(None, []).rl.dynamic_sampling == "accuracy"


def test_raw_template_encodes_prompt_text_verbatim_everywhere():
    from llada_cpt.data.chat import generation_prompt_ids
    from llada_cpt.inference.prompts import encode_record

    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

    assert encode_record({"prompt": "ab"}, Tok(), "raw") == [97, 98]
    assert generation_prompt_ids([{"role": "user", "content": "ab"}], Tok(), "raw") == [97, 98]

"""``model.transformer_impl``: local | transformer_engine | auto, chosen knowingly.

Here (CPU, no Transformer Engine) ``auto`` and ``local`` build Megatron-Core's local modules;
asking for ``transformer_engine`` is one clear error naming the fix, from the CLI too.
"""
from __future__ import annotations

import pytest

from run_helpers import TINY_CONFIG, assert_clean_error, cli, run


def test_choice_of_layer_modules():
    import torch

    from llada_cpt.errors import ConfigError
    from llada_cpt.kernels.te import import_error
    from llada_cpt.model.spec import use_transformer_engine

    assert use_transformer_engine("local") is False
    assert use_transformer_engine("auto") is (torch.cuda.is_available() and import_error() is None)
    if import_error() is not None or not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.transformer_impl=transformer_engine") as err:
            use_transformer_engine("transformer_engine")
        assert "model.transformer_impl=local" in str(err.value)
    with pytest.raises(ConfigError, match="not one of auto, local, transformer_engine"):
        use_transformer_engine("te")


def test_config_validation_lists_the_choices():
    from llada_cpt.config.loader import load_config
    from llada_cpt.config.validation import validate
    from llada_cpt.errors import ConfigError

    with pytest.raises(ConfigError,
                       match="model.transformer_impl `apex` is not one of auto, local, transformer_engine"):
        validate(load_config(None, ["data.demo=true", "model.vocab_size=128", "model.transformer_impl=apex"]))


@pytest.mark.timeout(300)
def test_cli_refuses_transformer_engine_where_it_is_missing(tmp_path):
    from llada_cpt.kernels.te import import_error

    if import_error() is None:
        pytest.skip("Transformer Engine is importable here")
    proc = run(cli("train", "-c", str(TINY_CONFIG), "--nproc", "1", "train.train_steps=1",
                   f"checkpoint.save_dir={tmp_path / 'ck'}", "model.transformer_impl=transformer_engine"),
               cwd=tmp_path, timeout=240)
    assert_clean_error(proc, "train", "model.transformer_impl=transformer_engine", "not importable",
                       "model.transformer_impl=local")
    assert not (tmp_path / "ck").exists()

import json

import pytest

from llada_cpt.diffusion.wsd import WSDSchedule
from llada_cpt.errors import ConfigError


def report_schedule(L=4096, tps=100):
    warm = [[1, 10], [4, 10], [32, 10], [64, 10]]
    decay = [[L // 2 ** k, 5] for k in range(1, 8)]  # 2048 ... 32
    return WSDSchedule.from_config(warm + [[L, 100]] + decay, L, "steps", tps)


def test_phase_boundaries_steps():
    s = report_schedule()
    tps = 100
    assert s.block_size(0) == 1
    assert s.block_size(10 * tps - 1) == 1
    assert s.block_size(10 * tps) == 4
    assert s.block_size(40 * tps) == 4096
    assert s.block_size(140 * tps - 1) == 4096
    assert s.block_size(140 * tps) == 2048
    assert s.block_size(175 * tps - 1) == 32
    assert s.block_size(10 ** 9) == 32  # the last phase lasts to the end


def test_tokens_unit_independent_of_batch_size():
    a = WSDSchedule.from_config([[1, 1000], [8, 1000], [64, 1]], 64, "tokens", 128)
    b = WSDSchedule.from_config([[1, 1000], [8, 1000], [64, 1]], 64, "tokens", 512)
    for consumed in (0, 999, 1000, 1999, 2000, 5000):
        assert a.block_size(consumed) == b.block_size(consumed)
    assert [a.block_size(c) for c in (999, 1000, 2000)] == [1, 8, 64]


@pytest.mark.parametrize("phases,msg", [
    ([[3, 10]], "block size 3 does not divide data.seq_length 64"),
    ([[128, 10]], "block size 128 does not divide"),
    ([[4, 0]], "must be >= 1"),
    ([], "is empty"),
    ([[4]], "must be \\[block_size, amount\\]"),
])
def test_invalid_schedules_rejected(phases, msg):
    with pytest.raises(ConfigError, match=msg):
        WSDSchedule.from_config(phases, 64, "steps", 10)


def test_bad_unit():
    with pytest.raises(ConfigError, match="steps` or `tokens"):
        WSDSchedule.from_config([[4, 1]], 64, "epochs", 10)


def test_state_round_trip():
    s = report_schedule()
    state = s.state_dict()
    assert s.check_state(state) == []
    other = WSDSchedule.from_config([[1, 5], [4096, 1]], 4096, "steps", 100)
    diffs = other.check_state(state)
    assert diffs and diffs[0].startswith("phases")


def _checkpoint_mid_schedule(tmp_path, consumed_steps):
    """An ``iter_*`` directory as the loop writes it: resolved config.yaml + metrics.json with consumed tokens."""
    from llada_cpt.config import dump_config, load_config

    cfg = load_config(None, ["data.demo=true", "data.seq_length=64", "train.global_batch_size=2",
                             "diffusion.block_schedule=[[1,10],[64,10],[16,5]]"])
    path = tmp_path / "iter_0000015"
    path.mkdir()
    (path / "metadata.json").write_text("{}")
    (path / "config.yaml").write_text(dump_config(cfg))
    (path / "metrics.json").write_text(json.dumps({"iteration": consumed_steps,
                                                   "consumed_tokens": consumed_steps * 2 * 64}))
    return cfg, path


@pytest.mark.parametrize("steps, block", [(15, 64), (5, 1), (10, 1), (11, 64), (30, 16)])
def test_one_trained_block_size_for_post_training_stages_and_generate(tmp_path, steps, block):
    """A run stopped mid-schedule (step 15 of phases 1x10, 64x10, 16x5) was last trained with block 64:
    SFT / DPO from it and ``generate`` on it must both pick the phase in force at its consumed tokens."""
    from llada_cpt.checkpoint.info import CheckpointInfo
    from llada_cpt.config import load_config
    from llada_cpt.stages.common import resolve_block_size

    cfg, path = _checkpoint_mid_schedule(tmp_path, steps)
    init = CheckpointInfo.read(str(path))  # what init_from and generate / eval / lm-eval read
    sft = load_config(None, ["data.demo=true", "data.seq_length=64"])
    assert resolve_block_size("sft", sft, init)[0] == block
    assert resolve_block_size("dpo", sft, init)[0] == block
    assert init.trained_block_size == block
    wsd = WSDSchedule.from_config(cfg.diffusion.block_schedule, 64, "steps", 2 * 64)
    assert wsd.trained_block_size(steps * 2 * 64) == block
    assert wsd.trained_block_size(None) == 16  # no consumed tokens (converted / merged): the last phase

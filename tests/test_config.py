import pytest
import yaml

from llada_cpt.config import config_from_dict, dump_config, load_config, validate
from llada_cpt.errors import ConfigError


def test_yaml_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: tiny\n  hidden_size: 256\ntrain:\n  lr: 1e-3\ndata:\n  demo: true\n")
    cfg = load_config(f, ["model.num_layers=6", "train.lr=2e-4", "diffusion.block_schedule=[[1, 5], [64, 10]]"])
    assert cfg.model.num_layers == 6 and cfg.model.hidden_size == 256  # explicit beats preset
    assert cfg.model.num_query_groups == 2  # from the preset
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.diffusion.block_schedule == [[1, 5], [64, 10]]
    validate(cfg, world_size=2)


def test_dump_round_trip():
    cfg = load_config(None, ["model.preset=tiny", "data.demo=true"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("override,msg", [
    (["model.num_layer=4"], "unknown config key `model.num_layer`. Did you mean `model.num_layers`"),
    (["trian.lr=1"], "unknown config key `trian`. Did you mean `train`"),
    (["model.num_layers=four"], "model.num_layers: expected int, got str"),
    (["model.qk_layernorm=1"], "model.qk_layernorm: expected bool, got int"),
    (["model.preset=qwen9"], "unknown model preset `qwen9`"),
    (["model.num_layers"], "section.key=value"),
    # choices (Literal annotations in schema.py): key, value, allowed values, closest match, on one line
    (["model.attention_backend=magic"], "model.attention_backend `magic` is not one of reference, flex, cudnn, te, "
                                        "auto.$"),
    (["model.attention_backend=flx"], "model.attention_backend `flx` is not one of reference, flex, cudnn, te, "
                                      "auto. Did you mean `flex`\\?$"),
    (["stage=sf"], "stage `sf` is not one of cpt, sft, dpo, rl. Did you mean `sft`"),
    (["model.rope_scaling=lama3"], "model.rope_scaling `lama3` is not one of llama3 \\(or null\\). "
                                   "Did you mean `llama3`"),
    (["train.precision=on"], "train.precision `True` is not one of auto, fp32, bf16. \\(YAML reads on/off"),
    (["sft.chat_template=chatlm"], "sft.chat_template `chatlm` is not one of auto, tokenizer, plain, chatml, raw. "
                                   "Did you mean `chatml`"),
])
def test_load_errors(override, msg):
    pattern = msg if "is not one of" in msg else msg.replace("[", "\\[").replace("(", "\\(")
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, override)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


@pytest.mark.parametrize("override,world,msg", [
    (["data.seq_length=100", "diffusion.block_schedule=[[32, 1]]"], None,
     "block size 32 does not divide data.seq_length=100"),
    (["parallel.tensor_model_parallel_size=3"], None,
     "num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3"),
    (["parallel.pipeline_model_parallel_size=3"], None,
     "num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=3"),
    (["parallel.tensor_model_parallel_size=2"], 3, "3 processes cannot be split"),
    (["train.global_batch_size=3"], 2, "global_batch_size=3 is not divisible"),
    (["parallel.context_parallel_size=2", "data.seq_length=6", "diffusion.block_schedule=[[2, 1]]"], None,
     "divisible by 2 \\* context_parallel_size"),
    (["parallel.expert_model_parallel_size=2"], None, "needs an MoE model"),
])
def test_validation_errors(override, world, msg):
    cfg = load_config(None, ["model.preset=tiny", "data.demo=true"] + override)
    with pytest.raises(ConfigError, match=msg):
        validate(cfg, world_size=world)


@pytest.mark.parametrize("override", [
    ["train.lr=0", "train.min_lr=0"],  # determinism checks / resuming without changing weights
    ["stage=sft", "diffusion.mask_ratio_min=0.3", "diffusion.mask_ratio_max=0.8"],  # asymmetric band
    ["stage=dpo", "dpo.lr=0"],
])
def test_boundary_values_that_are_legitimate(override):
    validate(load_config(None, ["model.preset=tiny", "data.demo=true"] + override))


def test_all_problems_listed():
    cfg = load_config(None, ["model.preset=tiny", "data.demo=true", "parallel.tensor_model_parallel_size=3",
                             "parallel.pipeline_model_parallel_size=3"])
    with pytest.raises(ConfigError, match="3 problems") as err:
        validate(cfg)
    assert "pipeline_model_parallel_size=3" in str(err.value) and "tensor_model_parallel_size=3" in str(err.value)


def test_a_choice_changed_in_code_is_caught_by_validate_with_the_loader_message():
    cfg = load_config(None, ["model.preset=tiny", "data.demo=true"])
    cfg.model.attention_backend, cfg.dpo.reference = "flx", "precomputd"
    with pytest.raises(ConfigError, match="2 problems") as err:
        validate(cfg)
    assert "model.attention_backend `flx` is not one of reference, flex, cudnn, te, auto. Did you mean `flex`?" \
        in str(err.value)
    assert "dpo.reference `precomputd` is not one of model, precomputed. Did you mean `precomputed`?" in str(err.value)


def test_choice_lists_elsewhere_are_read_from_the_schema_annotations():
    """One source of truth: the tuples other modules use are ``typing.get_args`` of the schema's Literals."""
    import typing

    from llada_cpt.config import schema
    from llada_cpt.data.chat import TEMPLATES
    from llada_cpt.data.sft import OVERLONG_POLICIES
    from llada_cpt.kernels import registry
    from llada_cpt.kernels.linear_cross_entropy import SETTINGS
    from llada_cpt.rl.dynamic_sampling import CRITERIA

    assert TEMPLATES == typing.get_args(schema.ChatTemplate) == ("auto", "tokenizer", "plain", "chatml", "raw")
    assert OVERLONG_POLICIES == typing.get_args(schema.OverlongPolicy)
    assert CRITERIA + ("none",) == typing.get_args(schema.DynamicSampling)
    assert registry.NAMES == typing.get_args(schema.AttentionBackend)
    assert set(registry.FUSED) == {"flex", "cudnn", "te"}
    assert SETTINGS == typing.get_args(schema.CrossEntropyImpl)

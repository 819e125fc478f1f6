"""Hugging Face <-> Megatron conversion: logits parity, exact round trips, parallel layouts, mask token.

Tiny random-init ``transformers`` models (fp32, every parameter randomised so that
swapped or misplaced tensors show) are saved as safetensors; the reference logits
are computed here, in the pytest process.  Everything Megatron runs in spawned
gloo ranks (``tests/dist.py``): import, reload through ``config.yaml`` +
``load_checkpoint`` (the ``train.init_from`` path), a causal forward
(``AttentionLayout(causal=True)``: block size 1, the x_0 half) and export.
"""
from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path

import pytest
import torch
import transformers  # the `hf` extra; the test extra must install it too

from dist import run_distributed
from llada_cpt.config.schema import ModelConfig, ParallelConfig
from llada_cpt.convert import ConvertError, ConvertInputMissing
from llada_cpt.convert.mapping import (
    ARCHITECTURES,
    canonical_name,
    fuse_qkv,
    hf_config_from_model,
    model_config_from_hf,
    split_qkv,
    tp_shard,
)

VOCAB = 100
L = 16
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
# every architecture, with the features that distinguish it switched on
ARCHS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    # Llama 3.1 RoPE scaling; original context 16 so that it changes frequencies that positions < 16 see
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=32, rope_theta=1e6)),  # head_dim != h/heads
    "qwen3_moe": ("Qwen3MoeConfig", dict(tie_word_embeddings=False, head_dim=16, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                                         mlp_only_layers=[0])),
}
MASK_CASE = "qwen3+tokenizer"  # qwen3 with a tokenizer lacking [MASK]
INFERRED = "llama"  # exported without the hf_template the import keeps
BROKEN = "llama-broken"  # fails half-way through the import
TOL = 1e-4
DOC_IDS = torch.tensor([[0] * 7 + [1] * 9, [0] * L])  # a packed 2-document row and a single document


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, L), generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------- HF side (pytest process)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Norm weights around 1, everything else random: a swapped tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 and "bias" not in name else 0.08 * noise)


def _hf_model(kind: str, directory: Path):
    cls_name, extra = ARCHS[kind]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomise(model, seed=list(ARCHS).index(kind))
    model.eval()
    model.save_pretrained(directory)
    return model


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Causal logits with every document of DOC_IDS run on its own (positions from 0)."""
    rows = []
    with torch.no_grad():
        for b in range(tokens.shape[0]):
            parts = [model(tokens[b:b + 1, DOC_IDS[b] == d]).logits[0] for d in DOC_IDS[b].unique()]
            rows.append(torch.cat(parts))
    return torch.stack(rows)


def _word_level_tokenizer(directory: Path, with_mask: bool = False) -> None:
    """A 100-token tokenizer (the model's vocabulary), without [MASK] unless asked."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2 - int(with_mask))]
    words += ["[MASK]"] if with_mask else []
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """HF directories, original state dicts and reference logits per case."""
    root = tmp_path_factory.mktemp("hf")
    tokens = _tokens()
    cases = {}
    for kind in ARCHS:
        model = _hf_model(kind, root / kind)
        cases[kind] = dict(dir=root / kind, state={k: v.clone() for k, v in model.state_dict().items()},
                           logits=_hf_logits(model, tokens))
    shutil.copytree(root / "qwen3", root / MASK_CASE)
    _word_level_tokenizer(root / MASK_CASE)
    cases[MASK_CASE] = dict(cases["qwen3"], dir=root / MASK_CASE)
    return dict(root=root, tokens=tokens, cases=cases, broken=_broken_copy(root / "llama", root / BROKEN))


def _broken_copy(src: Path, dst: Path) -> Path:
    """Right tensor names, one tensor of the wrong shape: found only while filling the Megatron model."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].T.contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- Megatron side (spawned ranks)


def _logits(run_dir: str, tokens: torch.Tensor, parallel: ParallelConfig) -> torch.Tensor:
    """Build the model from the checkpoint's config.yaml in ``parallel``, load it, causal forward, full vocab."""
    import dataclasses

    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from llada_cpt.checkpoint.info import CheckpointInfo
    from llada_cpt.checkpoint.megatron import load_checkpoint
    from llada_cpt.convert.hf_import import ensure_layout
    from llada_cpt.diffusion.layout import AttentionLayout
    from llada_cpt.model.provider import build_model

    ensure_layout(parallel)
    torch.manual_seed(7)  # another random init than the import's: nothing survives from it
    info = CheckpointInfo.read(run_dir)
    path, cfg = info.path, info.config
    rows = info.stored_embedding.shape[0]  # the padding of the TP size that saved it
    tp = parallel.tensor_model_parallel_size
    model_cfg = dataclasses.replace(cfg.model, make_vocab_size_divisible_by=rows // tp)
    (model,) = build_model(model_cfg, parallel, "fp32", cfg.model.vocab_size)
    load_checkpoint(path, [model], restore_rng=False)
    model.eval()
    layout = AttentionLayout(doc_ids=DOC_IDS, block_size=1, causal=True)
    with torch.no_grad():
        out = model(tokens, layout.position_ids(False), attention_mask=layout)
    return gather_from_tensor_model_parallel_region(out)


def _guard(results: dict, name: str, fn, *args) -> None:
    """Run one step of a case unless an earlier one failed; keep the first traceback."""
    if "traceback" in results.setdefault(name, {}):
        return
    try:
        results[name].update(fn(*args) or {})
    except Exception:
        results[name]["traceback"] = traceback.format_exc()


def _import(job: dict, parallel: ParallelConfig, world: int) -> dict:
    """Through the API, or through ``llada-cpt convert import`` as run by torchrun (WORLD_SIZE set)."""
    from llada_cpt.convert import cli
    from llada_cpt.convert.hf_import import import_hf, plan_import

    if job.get("cli"):
        p = parallel
        assert cli.main(["import", "--hf", job["hf"], "--out", job["run"], "--precision", "fp32",
                         "--tp", str(p.tensor_model_parallel_size), "--pp", str(p.pipeline_model_parallel_size),
                         "--ep", str(p.expert_model_parallel_size)]) == 0
        return {}
    plan = plan_import(job["hf"], job["run"], parallel, precision="fp32", world_size=world)
    import_hf(plan)
    return {"vocab": plan.model.vocab_size, "mask_id": plan.mask_id}


def _export(job: dict) -> None:
    from llada_cpt.convert import cli
    from llada_cpt.convert.hf_export import export_hf, plan_export

    if job.get("infer"):  # no template: the HF config is derived from our model config alone
        shutil.rmtree(Path(job["run"]) / "hf_template")
    if job.get("cli"):
        assert cli.main(["export", "--ckpt", job["run"], "--out", job["export"], "--max-shard-size", "100KB"]) == 0
    else:
        export_hf(plan_export(job["run"], job["export"]))


def _single_rank(rank: int, world: int, jobs: dict, tokens: torch.Tensor) -> dict:
    results: dict = {}
    for name, job in jobs.items():
        if "hf" in job:
            _guard(results, name, _import, job, ParallelConfig(), world)
            _guard(results, name, lambda: {"logits": _logits(job["run"], tokens, ParallelConfig())})
        _guard(results, name, _export, job)
    return results


def _two_ranks(rank: int, world: int, jobs: dict, tokens: torch.Tensor) -> dict:
    """Imports grouped by layout (one process-group set-up each), then all reloaded unsplit."""
    results: dict = {}
    for name, job in jobs.items():
        parallel = ParallelConfig(**LAYOUTS[job["layout"]])
        _guard(results, name, _import, job, parallel, world)
        if parallel.pipeline_model_parallel_size == 1:  # the target layout itself (no pipeline schedule needed)
            _guard(results, name, lambda: {"layout": _logits(job["run"], tokens, parallel)})
    for name, job in jobs.items():  # resharded into TP = PP = EP = 1
        _guard(results, name, lambda: {"unsplit": _logits(job["run"], tokens, ParallelConfig())})
    return results


LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2),
    "pp2": dict(pipeline_model_parallel_size=2),
    "ep2": dict(expert_model_parallel_size=2),
}
LAYOUT_CASES = [(kind, layout) for layout in ("tp2", "pp2") for kind in ARCHS] + [("qwen3_moe", "ep2")]
CLI_CASE = "qwen3_moe-tp2"  # imported and exported through the command line (export: small shards)


@pytest.fixture(scope="module")
def layouts(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    jobs = {f"{kind}-{layout}": dict(hf=str(hf["cases"][kind]["dir"]), run=str(out / f"{kind}-{layout}"),
                                     layout=layout, cli=f"{kind}-{layout}" == CLI_CASE)
            for kind, layout in LAYOUT_CASES}
    results = run_distributed(_two_ranks, 2, jobs, hf["tokens"], timeout=600)[0]
    return {name: dict(results[name], run=Path(job["run"])) for name, job in jobs.items()}


@pytest.fixture(scope="module")
def single(hf, layouts, tmp_path_factory):
    """Single-rank imports + exports; also exports the TP=2 checkpoint of the CLI case (after `layouts`)."""
    out = tmp_path_factory.mktemp("single")
    jobs = {name: dict(hf=str(c["dir"]), run=str(out / name / "run"), export=str(out / name / "hf"),
                       infer=name == INFERRED) for name, c in hf["cases"].items()}
    jobs[CLI_CASE] = dict(run=str(layouts[CLI_CASE]["run"]), export=str(out / CLI_CASE), cli=True)
    jobs[BROKEN] = dict(hf=str(hf["broken"]), run=str(out / BROKEN / "run"), export=str(out / BROKEN / "hf"))
    results = run_distributed(_single_rank, 1, jobs, hf["tokens"], timeout=600)[0]
    return {name: dict(results[name], run=Path(job["run"]), export=Path(job["export"])) for name, job in jobs.items()}


def _ok(result: dict) -> dict:
    if "traceback" in result:
        pytest.fail(f"the worker raised:\n{result['traceback']}")
    return result


def _assert_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape[:2] == ref.shape[:2] and ours.shape[-1] >= VOCAB
    diff = float((ours[..., :VOCAB] - ref).abs().max())
    assert diff <= TOL, f"max |logit difference| {diff:.2e} > {TOL}"


# ----------------------------------------------------------------------------- tests: parity and round trip


@pytest.mark.parametrize("kind", list(ARCHS))
def test_imported_model_matches_transformers_logits(single, hf, kind):
    r = _ok(single[kind])
    ref = hf["cases"][kind]["logits"]
    assert float(ref.abs().max()) > 0.1  # the randomised model gives non-trivial logits
    _assert_logits(r["logits"], ref)
    assert r["vocab"] == VOCAB and r["mask_id"] is None  # no tokenizer: vocabulary untouched


@pytest.mark.parametrize("kind", list(ARCHS))
def test_export_reloads_in_transformers_with_identical_tensors(single, hf, kind):
    _ok(single[kind])
    original = hf["cases"][kind]["state"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(single[kind]["export"], dtype=torch.float32,
                                                                 attn_implementation="eager")
    got = reloaded.state_dict()
    assert set(got) == set(original)
    different = [k for k in original if not torch.equal(got[k], original[k])]
    assert not different, f"tensors changed by import + export: {different[:5]}"
    assert type(reloaded).__name__ == ARCHS[kind][0].replace("Config", "ForCausalLM")
    # the config too: same logits (RoPE base, eps, head_dim, routing ...), with or without a template
    diff = float((_hf_logits(reloaded.eval(), hf["tokens"]) - hf["cases"][kind]["logits"]).abs().max())
    assert diff <= 1e-5


def test_checkpoint_config_records_model_and_layout(single):
    import yaml

    run = single["qwen3_moe"]["run"]
    _ok(single["qwen3_moe"])
    assert (run / "latest").read_text().strip() == "iter_0000000"
    cfg = yaml.safe_load((run / "iter_0000000" / "config.yaml").read_text())
    m = cfg["model"]
    assert (m["num_layers"], m["hidden_size"], m["num_attention_heads"], m["num_query_groups"], m["kv_channels"]) == \
        (2, 64, 4, 2, 16)
    assert (m["num_experts"], m["moe_router_topk"], m["moe_ffn_hidden_size"], m["moe_first_dense_layers"]) == \
        (4, 2, 48, 1)
    assert m["qk_layernorm"] and not m["add_qkv_bias"] and m["untie_embeddings_and_output_weights"]
    assert json.loads((run / "iter_0000000" / "metrics.json").read_text())["architecture"] == "qwen3_moe"
    assert (run / "hf_template" / "config.json").is_file()
    assert not [p for p in run.parent.iterdir() if ".tmp-" in p.name]  # no temporary leftovers


def test_failed_import_leaves_nothing_behind(single):
    r = single[BROKEN]
    assert "ConvertError" in r.get("traceback", "") and "config.json does not match the weights" in r["traceback"]
    assert "model.layers.1.mlp.down_proj.weight" in r["traceback"]
    assert list(r["run"].parent.iterdir()) == []  # neither the output nor its temporary directory


# ----------------------------------------------------------------------------- tests: mask token


def test_mask_token_is_added_with_a_zero_row(single, hf):
    from llada_cpt.data.tokenizer import Tokenizer

    r = _ok(single[MASK_CASE])
    assert (r["vocab"], r["mask_id"]) == (VOCAB + 1, VOCAB)
    _assert_logits(r["logits"], hf["cases"][MASK_CASE]["logits"])  # original ids unchanged
    tok = Tokenizer.from_file(single[MASK_CASE]["run"] / "tokenizer")
    assert (tok.mask_id, tok.mask_added, tok.vocab_size) == (VOCAB, False, VOCAB + 1)  # persisted, not re-added
    import yaml

    cfg = yaml.safe_load((single[MASK_CASE]["run"] / "iter_0000000" / "config.yaml").read_text())
    assert cfg["diffusion"]["mask_id"] == VOCAB and cfg["model"]["vocab_size"] == VOCAB + 1
    assert Path(cfg["data"]["tokenizer"]) == single[MASK_CASE]["run"] / "tokenizer" / "tokenizer.json"
    # export: one more (zero) row, tied head; transformers loads model and tokenizer with the mask token
    export = single[MASK_CASE]["export"]
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    emb = model.get_input_embeddings().weight
    original = hf["cases"][MASK_CASE]["state"]["model.embed_tokens.weight"]
    assert emb.shape == (VOCAB + 1, 64) and model.config.vocab_size == VOCAB + 1
    assert torch.equal(emb[:VOCAB], original) and not emb[VOCAB].any()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    assert hf_tok.convert_tokens_to_ids("[MASK]") == VOCAB and hf_tok.mask_token == "[MASK]"


def test_tokenizer_that_has_a_mask_keeps_its_vocabulary(tmp_path):
    from llada_cpt.convert.hf_import import plan_import

    src = tmp_path / "hf"
    _hf_model("llama", src)
    _word_level_tokenizer(src, with_mask=True)
    plan = plan_import(src, tmp_path / "out")
    assert (plan.model.vocab_size, plan.mask_id, plan.tokenizer.mask_added) == (VOCAB, VOCAB - 1, False)


# ----------------------------------------------------------------------------- tests: parallel layouts


@pytest.mark.parametrize("kind,layout", LAYOUT_CASES)
def test_import_with_parallel_layout_gives_same_logits(layouts, hf, kind, layout):
    r = _ok(layouts[f"{kind}-{layout}"])
    ref = hf["cases"][kind]["logits"]
    _assert_logits(r["unsplit"], ref)
    if "layout" in r:
        _assert_logits(r["layout"], ref)


def test_cli_import_tp2_then_export_in_small_shards(single, layouts, hf):
    """`convert import --tp 2` under a 2-rank launch, then `convert export` reshards it back to the original."""
    _ok(layouts[CLI_CASE])
    _ok(single[CLI_CASE])
    assert json.loads((layouts[CLI_CASE]["run"] / "iter_0000000" / "metrics.json").read_text())["world_size"] == 2
    export = single[CLI_CASE]["export"]
    assert len(list(export.glob("model-*-of-*.safetensors"))) > 1
    assert (export / "model.safetensors.index.json").is_file()
    got = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).state_dict()
    original = hf["cases"]["qwen3_moe"]["state"]
    assert set(got) == set(original) and all(torch.equal(got[k], original[k]) for k in original)


# ----------------------------------------------------------------------------- tests: bad inputs (no Megatron)


def test_missing_directory_is_one_clear_error(tmp_path):
    from llada_cpt.convert.hf_import import plan_import

    with pytest.raises(ConvertInputMissing, match="does not exist"):
        plan_import(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertInputMissing, match="no config.json"):
        plan_import(tmp_path / "empty", tmp_path / "out")


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_architecture_and_features_are_refused(hf, tmp_path):
    from llada_cpt.convert.hf_import import plan_import

    src = hf["cases"]["llama"]["dir"]
    gpt2 = _with_config(src, tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConvertError, match=r"architecture `gpt2` is not supported; supported .*qwen3_moe"):
        plan_import(gpt2, tmp_path / "out")
    scaled = _with_config(src, tmp_path / "scaled", rope_scaling={"rope_type": "yarn", "factor": 8.0},
                          attention_bias=True)
    with pytest.raises(ConvertError, match=r"RoPE scaling `yarn`.*attention_bias|attention_bias.*RoPE scaling"):
        plan_import(scaled, tmp_path / "out")
    deeper = _with_config(src, tmp_path / "deeper", num_hidden_layers=3)
    with pytest.raises(ConvertError, match=r"do not match its config.json: missing .*model.layers.2"):
        plan_import(deeper, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_path_rules(hf, tmp_path):
    from llada_cpt.convert.hf_import import plan_import

    src = hf["cases"]["llama"]["dir"]
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConvertError, match="already exists"):
        plan_import(src, tmp_path / "taken")
    with pytest.raises(ConvertError, match="inside the input"):
        plan_import(src, src / "converted")
    with pytest.raises(ConvertError, match="--tp 3 must divide"):
        plan_import(src, tmp_path / "out", ParallelConfig(tensor_model_parallel_size=3))


def test_cli_reports_one_line_and_exit_code_2(tmp_path, capsys):
    from llada_cpt.cli import main

    assert main(["convert", "import", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llada-cpt convert: error: Hugging Face model directory")
    assert main(["convert", "export", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tests: pure mapping


def test_qkv_fusion_follows_megatron_query_groups():
    """Megatron's view of linear_qkv output (as in get_query_key_value_tensors) gives HF's heads."""
    heads, groups, d, h = 6, 2, 4, 8
    g = torch.Generator().manual_seed(0)
    wq, wk, wv = (torch.randn(n * d, h, generator=g) for n in (heads, groups, groups))
    x = torch.randn(3, h, generator=g)
    mixed = x @ fuse_qkv(wq, wk, wv, heads, groups).T  # [s, groups * (heads/groups + 2) * d]
    per = heads // groups
    q, k, v = mixed.view(3, groups, (per + 2) * d).split([per * d, d, d], dim=-1)
    assert torch.allclose(q.reshape(3, heads, d), (x @ wq.T).view(3, heads, d))
    assert torch.allclose(k, (x @ wk.T).view(3, groups, d)) and torch.allclose(v, (x @ wv.T).view(3, groups, d))
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(wq, wk, wv, heads, groups), heads, groups),
                                                 (wq, wk, wv)))


def test_glu_tp_shard_takes_each_half():
    fc1 = torch.arange(8.0).view(8, 1)  # gate rows 0-3, up rows 4-7
    assert tp_shard(fc1, "glu", 0, 1, 2).flatten().tolist() == [2, 3, 6, 7]
    assert tp_shard(fc1, "copy", 0, 1, 2).flatten().tolist() == [4, 5, 6, 7]


def test_canonical_names_cover_te_spec_and_offsets():
    assert canonical_name("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", 4) == \
        "decoder.layers.5.input_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.experts.linear_fc2.weight3", 2, 8) == \
        "decoder.layers.2.mlp.experts.11.linear_fc2.weight"
    assert canonical_name("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight", 0, 2) == \
        "decoder.layers.0.mlp.experts.3.linear_fc1.weight"
    assert canonical_name("embedding.word_embeddings.weight", 3, 3) == "embedding.word_embeddings.weight"


@pytest.mark.parametrize("kind", list(ARCHITECTURES) + ["llama3"])
def test_config_mapping_round_trips(kind):
    scaled = kind == "llama3"  # Llama with Llama 3.1 RoPE scaling
    kind = "llama" if scaled else kind
    m = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                    kv_channels=32, vocab_size=123, rotary_base=5e5, norm_epsilon=1e-5,
                    qk_layernorm=ARCHITECTURES[kind].qk_norm, add_qkv_bias=ARCHITECTURES[kind].qkv_bias,
                    untie_embeddings_and_output_weights=kind != "llama", max_position_embeddings=256)
    if scaled:
        m = ModelConfig(**{**m.__dict__, "rope_scaling": "llama3", "rope_scaling_factor": 32.0,
                           "rope_original_max_position_embeddings": 4096})
    if ARCHITECTURES[kind].moe:
        m = ModelConfig(**{**m.__dict__, "num_experts": 8, "moe_router_topk": 2, "moe_ffn_hidden_size": 32,
                           "moe_first_dense_layers": 1})
    arch, hf_cfg = hf_config_from_model(m, 123)
    assert arch.model_type == kind
    back_arch, back = model_config_from_hf(hf_cfg)
    assert back_arch is arch
    assert back == m

"""Model provider + block-diffusion attention on the real Megatron-Core GPTModel (CPU, gloo).

The Megatron checks run in one spawned rank (``tests/dist.py``) so that the CPU
patches never touch the pytest process; each check's outcome is returned and
asserted by its own test.  RoPE and the world-size check are pure and run here.
"""
from __future__ import annotations

import math
import traceback

import pytest
import torch

from dist import run_distributed
from llada_cpt.attention.rope import apply_rotary, rotary_cos_sin
from llada_cpt.config.schema import ModelConfig, ParallelConfig
from llada_cpt.errors import ConfigError
from llada_cpt.training.distributed import check_world_size

L = 16
VOCAB = 100
MASK_ID = VOCAB - 1
# three packed documents of unaligned lengths, and one single document
DOC_IDS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])

DENSE = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    qk_layernorm=True, make_vocab_size_divisible_by=32, rotary_base=10000.0,
)


def _tokens(seed: int, shape=(2, L)) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- worker


def _build(model_kw: dict, parallel=None):
    from llada_cpt.model.provider import build_model

    (model,) = build_model(ModelConfig(**model_kw), parallel or ParallelConfig(), "fp32", vocab_size=VOCAB)
    return model


def _check_block_size_one(model):
    """B = 1: the x_0 half of the BDLM forward equals a causal forward of x_0 alone."""
    from llada_cpt.diffusion.inputs import build_diffusion_batch
    from llada_cpt.diffusion.layout import AttentionLayout

    x0 = _tokens(1)
    batch = build_diffusion_batch(x0, DOC_IDS, 1, MASK_ID, generator=torch.Generator().manual_seed(2))
    causal = AttentionLayout(doc_ids=DOC_IDS, block_size=1, causal=True)
    with torch.no_grad():
        bdlm = model(batch.input_ids, batch.position_ids, attention_mask=batch.layout)
        ar = model(x0, causal.position_ids(False), attention_mask=causal)
        # the mask matters: a causal forward with positions not restarting per document differs
        plain = AttentionLayout(doc_ids=torch.zeros_like(DOC_IDS), block_size=1, causal=True)
        undocumented = model(x0, plain.position_ids(False), attention_mask=plain)
    return {
        "diff": float((bdlm[:, L:] - ar).abs().max()),
        "scale": float(ar.abs().max()),
        "masked": int(batch.masked.sum()),
        "doc_effect": float((undocumented - ar).abs().max()),
    }


def _check_mdlm(model):
    """B >= L: the MDLM input (x_t alone) equals the x_t half of the 2L input with block size L."""
    from llada_cpt.diffusion.inputs import build_diffusion_batch
    from llada_cpt.diffusion.layout import AttentionLayout

    x0 = _tokens(3)
    batch = build_diffusion_batch(x0, DOC_IDS, L, MASK_ID, generator=torch.Generator().manual_seed(4))
    assert batch.layout.mdlm and batch.input_ids.shape[1] == L
    two = AttentionLayout(doc_ids=DOC_IDS, block_size=L)
    with torch.no_grad():
        mdlm = model(batch.input_ids, batch.position_ids, attention_mask=batch.layout)
        full = model(torch.cat([batch.input_ids, x0], 1), two.position_ids(False), attention_mask=two)
    return {"diff": float((full[:, :L] - mdlm).abs().max()), "scale": float(mdlm.abs().max())}


def _check_per_token_loss(model):
    """``labels=`` gives the per-token CE ``[b, S]`` of the logits (over the padded vocab)."""
    from llada_cpt.diffusion.inputs import build_diffusion_batch

    batch = build_diffusion_batch(_tokens(5), DOC_IDS, 4, MASK_ID, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        loss = model(batch.input_ids, batch.position_ids, attention_mask=batch.layout, labels=batch.labels)
        logits = model(batch.input_ids, batch.position_ids, attention_mask=batch.layout)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
    return {"shape": tuple(loss.shape), "want": tuple(batch.input_ids.shape),
            "diff": float((ce.view_as(loss) - loss).abs().max())}


def _check_head_on_noised_half(model):
    """The step's loss with the LM head on the x_t half == the full-head per-token loss; the head sees S/2 rows."""
    from llada_cpt.diffusion.inputs import build_diffusion_batch
    from llada_cpt.training.step import forward_backward

    batch = build_diffusion_batch(_tokens(11), DOC_IDS, 4, MASK_ID, generator=torch.Generator().manual_seed(12))
    rows = []
    handle = model.output_layer.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            res = forward_backward([model], [batch], forward_only=True)
            rows_step = list(rows)
            full = model(batch.input_ids, batch.position_ids, attention_mask=batch.layout, labels=batch.labels)
    finally:
        handle.remove()
    want = float((full * batch.loss_weight).sum() / batch.num_eligible)
    return {"loss": res.loss, "want": want, "rows_step": rows_step, "rows_full": rows[len(rows_step):],
            "S": batch.input_ids.shape[1]}


def _check_not_a_layout(model):
    x0 = _tokens(7)
    try:
        model(x0, torch.arange(L).expand(2, L), attention_mask=torch.ones(2, 1, L, L, dtype=torch.bool))
    except TypeError as err:
        return {"error": str(err)}
    return {"error": None}


def _train_step(model, batches):
    from llada_cpt.training.distributed import wrap_ddp
    from llada_cpt.training.step import forward_backward

    chunks = wrap_ddp([model], ParallelConfig(use_distributed_optimizer=False))
    result = forward_backward(chunks, batches)
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    return result, grads


def _batches(n: int, block_size: int, seed: int):
    from llada_cpt.diffusion.inputs import build_diffusion_batch

    g = torch.Generator().manual_seed(seed)
    return [build_diffusion_batch(_tokens(seed + i), DOC_IDS, block_size, MASK_ID, generator=g) for i in range(n)]


def _check_dense_features():
    """MHA + QKV bias + tied embeddings + LayerNorm/GELU builds, runs and trains the bias."""
    kw = dict(DENSE, num_query_groups=None, qk_layernorm=False, add_qkv_bias=True,
              untie_embeddings_and_output_weights=False, normalization="LayerNorm", activation="gelu")
    model = _build(kw)
    names = [n for n, _ in model.named_parameters()]
    result, grads = _train_step(model, _batches(1, 4, 8))
    qkv_bias = [n for n in names if n.endswith("linear_qkv.bias")]
    return {
        "loss": result.loss,
        "tied": model.share_embeddings_and_output_weights and "output_layer.weight" not in names,
        "qkv_bias": len(qkv_bias),
        "bias_grad": float(sum(grads[n].abs().sum() for n in qkv_bias)),
        "all_grads_finite": all(bool(torch.isfinite(g).all()) for g in grads.values()),
    }


def _check_moe(extra: dict):
    from llada_cpt.config.presets import preset_dict

    kw = dict(preset_dict("tiny-moe"), num_layers=2, hidden_size=64, ffn_hidden_size=96, moe_ffn_hidden_size=48,
              moe_shared_expert_intermediate_size=48, make_vocab_size_divisible_by=32, **extra)
    model = _build(kw)
    layer = model.decoder.layers[1]
    bias_before = None if layer.mlp.router.expert_bias is None else layer.mlp.router.expert_bias.clone()
    result, grads = _train_step(model, _batches(2, 4, 9))
    expert_grads = [g for n, g in grads.items() if "experts" in n]
    return {
        "loss": result.loss,
        "aux": result.aux_losses,
        "dense_first": type(model.decoder.layers[0].mlp).__name__,
        "moe_second": type(layer.mlp).__name__,
        "shared": layer.mlp.shared_experts is not None,
        "expert_grad": float(sum(g.abs().sum() for g in expert_grads)),
        "n_expert_params": len(expert_grads),
        "bias_moved": None if bias_before is None else float((layer.mlp.router.expert_bias - bias_before).abs().sum()),
    }


def _check_recompute():
    """Full and selective recomputation (the layout rides through Megatron's checkpoint) change nothing."""
    plain = _build(DENSE)
    batches = _batches(2, 4, 12)
    want, want_grads = _train_step(plain, batches)
    out = {}
    for granularity in ("full", "selective"):
        model = _build(dict(DENSE, recompute_granularity=granularity))
        model.load_state_dict(plain.state_dict())
        got, grads = _train_step(model, batches)
        out[granularity] = {
            "loss_diff": abs(got.loss - want.loss),
            "grad_diff": max(float((grads[n] - g).abs().max()) for n, g in want_grads.items()),
            "grad_scale": max(float(g.abs().max()) for g in want_grads.values()),
        }
    return out


def _check_embedding_noise(model):
    """The hook changes the embedding output exactly at the masked x_t positions."""
    from llada_cpt.config.schema import DiffusionConfig
    from llada_cpt.diffusion.inputs import build_diffusion_batch
    from llada_cpt.model.embedding_noise import EmbeddingNoise

    batch = build_diffusion_batch(_tokens(10), DOC_IDS, 4, MASK_ID, generator=torch.Generator().manual_seed(11))
    captured = []
    noise = EmbeddingNoise(DiffusionConfig(embedding_noise_std=0.5, embedding_noise_steps=4), MASK_ID, seed=3)
    noise.attach(model)
    capture = model.embedding.register_forward_hook(lambda m, a, out: captured.append(out.detach().clone()))
    with torch.no_grad():
        for step in (0, 4):
            noise.set_step(step)
            model(batch.input_ids, batch.position_ids, attention_mask=batch.layout)
    noise.detach()
    capture.remove()
    noisy, clean = captured  # [S, b, h]
    changed = (noisy != clean).any(-1).transpose(0, 1)  # [b, S]
    expected = torch.zeros_like(changed)
    expected[:, :L] = batch.masked
    return {"match": bool((changed == expected).all()), "n_changed": int(changed.sum())}


def _check_bf16_dtypes():
    """bf16 precision: every parameter in bf16, the norms too (torch creates those in fp32)."""
    from llada_cpt.model.provider import build_model

    (model,) = build_model(ModelConfig(**DENSE), ParallelConfig(), "bf16", vocab_size=VOCAB)
    return {"not_bf16": sorted(n for n, p in model.named_parameters() if p.dtype != torch.bfloat16),
            "norms": sum("layernorm" in n for n, _ in model.named_parameters())}


def _model_checks(rank: int, world: int) -> dict:
    from llada_cpt.training.distributed import initialize

    initialize(ParallelConfig(), seed=1234)
    model = _build(DENSE)
    model.eval()
    checks = {
        "block_size_one": lambda: _check_block_size_one(model),
        "mdlm": lambda: _check_mdlm(model),
        "per_token_loss": lambda: _check_per_token_loss(model),
        "head_on_noised_half": lambda: _check_head_on_noised_half(model),
        "not_a_layout": lambda: _check_not_a_layout(model),
        "embedding_noise": lambda: _check_embedding_noise(model),
        "dense_features": _check_dense_features,
        "recompute": _check_recompute,
        "bf16_dtypes": _check_bf16_dtypes,
        "moe_aux_loss": lambda: _check_moe({}),
        "moe_expert_bias": lambda: _check_moe(dict(
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_load_balancing_type="none")),
    }
    out = {}
    for name, fn in checks.items():
        try:
            out[name] = fn()
        except Exception:  # reported by the test that needs it
            out[name] = {"traceback": traceback.format_exc()}
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_model_checks, 1)[0]


def _get(results, name):
    res = results[name]
    if "traceback" in res:
        pytest.fail(f"{name} raised in the worker:\n{res['traceback']}")
    return res


# ----------------------------------------------------------------------------- tests


def test_block_size_one_is_causal(results):
    r = _get(results, "block_size_one")
    assert r["masked"] > 0  # the x_t half really differs from x_0
    assert r["diff"] <= 1e-5 * max(1.0, r["scale"])
    assert r["doc_effect"] > 1e-3  # document boundaries and restarting positions are in effect


def test_mdlm_equals_xt_half_of_full_block(results):
    r = _get(results, "mdlm")
    assert r["diff"] <= 1e-5 * max(1.0, r["scale"])


def test_labels_give_per_token_loss(results):
    r = _get(results, "per_token_loss")
    assert r["shape"] == r["want"]
    assert r["diff"] < 1e-4


def test_lm_head_runs_on_the_noised_half_with_the_full_head_loss(results):
    res = _get(results, "head_on_noised_half")
    assert res["rows_step"] == [res["S"] // 2] and res["rows_full"] == [res["S"]]
    assert res["loss"] == pytest.approx(res["want"], rel=1e-5)


def test_dense_mask_tensor_is_rejected(results):
    r = _get(results, "not_a_layout")
    assert r["error"] and "AttentionLayout" in r["error"]


def test_embedding_noise_hook_on_gpt_model(results):
    r = _get(results, "embedding_noise")
    assert r["n_changed"] > 0
    assert r["match"]


def test_dense_features_build_and_train(results):
    r = _get(results, "dense_features")
    assert math.isfinite(r["loss"]) and r["loss"] > 0
    assert r["tied"]
    assert r["qkv_bias"] == DENSE["num_layers"] and r["bias_grad"] > 0
    assert r["all_grads_finite"]


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_activation_recompute_gives_same_loss_and_grads(results, granularity):
    r = _get(results, "recompute")[granularity]
    assert r["loss_diff"] <= 1e-6
    assert r["grad_diff"] <= 1e-5 * r["grad_scale"]


def test_bf16_model_has_every_parameter_in_bf16(results):
    res = _get(results, "bf16_dtypes")
    assert res["norms"] > 0
    assert res["not_bf16"] == []


def test_moe_forward_backward_with_aux_loss(results):
    r = _get(results, "moe_aux_loss")
    assert math.isfinite(r["loss"])
    assert r["dense_first"] == "MLP" and r["moe_second"] == "MoELayer" and r["shared"]
    assert r["n_expert_params"] > 0 and r["expert_grad"] > 0
    assert r["aux"].get("load_balancing_loss", 0.0) > 0


def test_moe_aux_loss_free_expert_bias_updates(results):
    r = _get(results, "moe_expert_bias")
    assert math.isfinite(r["loss"])
    assert r["bias_moved"] is not None and r["bias_moved"] > 0


def test_rope_is_relative_and_matches_rotate_half():
    d, base = 8, 10000.0
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, d, generator=g)

    def rotated(x, pos):
        cos, sin = rotary_cos_sin(torch.tensor([[pos]]), d, base)
        return apply_rotary(x, cos, sin)

    # <R(m) q, R(n) k> depends only on m - n
    a = (rotated(q, 7) * rotated(k, 3)).sum()
    b = (rotated(q, 14) * rotated(k, 10)).sum()
    assert torch.allclose(a, b, atol=1e-5)
    # dimension i pairs with i + d/2 and turns by pos * base^(-2i/d) (HF Llama convention)
    pos, i = 5, 1
    angle = pos * base ** (-2 * i / d)
    x = torch.zeros(1, 1, 1, d)
    x[..., i] = 1.0
    y = rotated(x, pos)
    assert torch.allclose(y[..., i], torch.tensor(math.cos(angle)))
    assert torch.allclose(y[..., i + d // 2], torch.tensor(math.sin(angle)))


def test_world_size_must_fit_parallel_sizes():
    assert check_world_size(ParallelConfig(tensor_model_parallel_size=2), 4) == 2
    with pytest.raises(ConfigError, match="world size 3 .*tensor_model_parallel_size \\(2\\)"):
        check_world_size(ParallelConfig(tensor_model_parallel_size=2), 3)
    with pytest.raises(ConfigError, match="expert_model_parallel_size \\(4\\)"):
        check_world_size(ParallelConfig(expert_model_parallel_size=4), 2)

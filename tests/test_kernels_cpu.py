"""Fused-attention backends, the parts that run on CPU.

FlexAttention's mask_mod and BlockMask against the binding dense mask, eager
FlexAttention outputs against the reference backend (incl. GQA and context
parallelism), the cuDNN/TE additive bias through SDPA (forward and gradients),
the per-step mask cache, ``auto`` on CPU and the errors of unavailable backends.
The same backends on a GPU are tested in ``test_kernels_gpu.py``.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script, random_doc_ids
from llada_cpt.attention.reference import reference_attention
from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.errors import ConfigError
from llada_cpt.parallel.context import zigzag_positions

flex = pytest.importorskip("llada_cpt.kernels.flex")
if flex.flex_attention is None:
    pytest.skip("this torch has no FlexAttention", allow_module_level=True)

from torch.nn.attention.flex_attention import create_mask  # noqa: E402

from llada_cpt.kernels import bias as kbias  # noqa: E402
from llada_cpt.kernels import cudnn as kcudnn  # noqa: E402
from llada_cpt.kernels import registry  # noqa: E402
from llada_cpt.kernels import te as kte  # noqa: E402
from llada_cpt.kernels.layout_cache import LayoutCache  # noqa: E402
from llada_cpt.kernels.tiles import tile_occupancy  # noqa: E402

L = 32


def _doc_ids(seed: int, batch: int = 2, length: int = L) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([random_doc_ids(length, g) for _ in range(batch)])


def _layouts():
    """(id, layout): BDLM block sizes 1, 4, L; MDLM; causal; a CP rank's local positions."""
    doc = _doc_ids(0)
    cases = [(f"bdlm-B{B}", AttentionLayout(doc_ids=doc, block_size=B)) for B in (1, 4, L)]
    cases.append(("mdlm", AttentionLayout(doc_ids=_doc_ids(1), block_size=L, mdlm=True)))
    cases.append(("causal", AttentionLayout(doc_ids=_doc_ids(2), block_size=1, causal=True)))
    cp = AttentionLayout(doc_ids=_doc_ids(3), block_size=4)
    cases.append(("cp2-rank1-B4", cp.with_local_positions(zigzag_positions(L, 2, 1))))
    cases.append(("cp2-rank0-mdlm", AttentionLayout(doc_ids=_doc_ids(4), block_size=L, mdlm=True)
                  .with_local_positions(zigzag_positions(L, 2, 0))))
    return cases


LAYOUTS = _layouts()
IDS = [name for name, _ in LAYOUTS]


def _qkv(layout: AttentionLayout, hq=4, hkv=2, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = layout.doc_ids.shape[0]
    sq, sk = layout.global_index(True).numel(), layout.global_index(False).numel()
    q = torch.randn(b, hq, sq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype)
    return q, k, v


def _tiles(mask: torch.Tensor, tile: int):
    """``(any, all)`` per ``tile x tile`` tile of a ``[b, Sq, Sk]`` mask (edge tiles: valid part only)."""
    b, sq, sk = mask.shape
    nq, nk = -(-sq // tile), -(-sk // tile)
    anyt = torch.zeros(b, nq, nk, dtype=torch.bool)
    allt = torch.zeros(b, nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            t = mask[:, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
            anyt[:, i, j] = t.flatten(1).any(1)
            allt[:, i, j] = t.flatten(1).all(1)
    return anyt, allt


def _blocks(num: torch.Tensor, idx: torch.Tensor, nk: int) -> torch.Tensor:
    """Dense ``[b, nq, nk]`` bool from a BlockMask's (num_blocks, indices) pair (head 0)."""
    b, _, nq = num.shape
    out = torch.zeros(b, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for qi in range(nq):
            out[bi, qi, idx[bi, 0, qi, : num[bi, 0, qi]].long()] = True
    return out


# ----------------------------------------------------------------------------- FlexAttention mask


@pytest.mark.parametrize("name,layout", LAYOUTS, ids=IDS)
def test_mask_mod_equals_dense_mask(name, layout):
    """The mask_mod evaluated on the full (query, key) grid is exactly ``layout.dense_mask()``."""
    sq, sk = layout.global_index(True).numel(), layout.global_index(False).numel()
    mask_mod = flex.bdlm_mask_mod(layout, torch.device("cpu"))
    got = create_mask(mask_mod, layout.doc_ids.shape[0], 1, sq, sk, device="cpu")
    want = layout.dense_mask(local_queries=True)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < want.numel()  # the case is neither empty nor dense


@pytest.mark.parametrize("name,layout", LAYOUTS, ids=IDS)
def test_block_mask_tiles_match_dense_mask(name, layout):
    """BlockMask: non-empty tiles = tiles with an allowed pair, full tiles = tiles with all allowed."""
    tile = 8
    bm = flex.build_block_mask(layout, torch.device("cpu"), tile=tile)
    want_any, want_all = _tiles(layout.dense_mask()[:, 0], tile)
    nk = want_any.shape[-1]
    partial = _blocks(bm.kv_num_blocks, bm.kv_indices, nk)
    full = _blocks(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
    assert torch.equal(bm.to_dense()[:, 0].bool(), want_any)
    assert torch.equal(partial | full, want_any)
    assert torch.equal(full, want_all)
    assert not (partial & full).any()
    nonempty, full_fraction = tile_occupancy(layout, tile=tile)
    assert nonempty == pytest.approx(float(want_any.float().mean()))
    assert full_fraction == pytest.approx(float(want_all.float().mean()))


def test_tile_occupancy_of_unit_tiles_is_mask_density():
    layout = AttentionLayout(doc_ids=_doc_ids(5), block_size=4)
    dense = layout.dense_mask().float()
    nonempty, full = tile_occupancy(layout, tile=1, rows_per_chunk=16)
    assert nonempty == pytest.approx(float(dense.mean())) == pytest.approx(full)


# ----------------------------------------------------------------------------- FlexAttention outputs


@pytest.mark.parametrize("name,layout", LAYOUTS, ids=IDS)
def test_flex_forward_matches_reference(name, layout):
    """Eager FlexAttention (GQA 4:2, non-default scale) equals SDPA on the dense mask."""
    q, k, v = _qkv(layout)
    scale = 0.3
    got = flex.flex_attention_backend(q, k, v, layout, scale)
    want = reference_attention(q, k, v, layout, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flex_context_parallel_halves_reassemble_full_output():
    """CP = 2 in one process: each rank's local queries against all keys, concatenated = no-CP output."""
    layout = AttentionLayout(doc_ids=_doc_ids(6), block_size=4)
    q, k, v = _qkv(layout, seed=1)
    full = reference_attention(q, k, v, layout, 0.25)
    out = torch.zeros_like(full)
    for rank in range(2):
        local = layout.with_local_positions(zigzag_positions(L, 2, rank))
        rows = local.global_index(True)
        out[:, :, rows] = flex.flex_attention_backend(q[:, :, rows], k, v, local, 0.25)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_flex_rejects_wrong_lengths_and_cpu_backward():
    layout = AttentionLayout(doc_ids=_doc_ids(7), block_size=4)
    q, k, v = _qkv(layout)
    with pytest.raises(ValueError, match="queries x"):
        flex.flex_attention_backend(q[:, :, :-1], k, v, layout, 0.3)
    q.requires_grad_(True)
    with pytest.raises(ConfigError, match="reference"):
        flex.flex_attention_backend(q, k, v, layout, 0.3)


# ----------------------------------------------------------------------------- RoPE and the attention module


def _attention_layers(n: int, scaling=None):
    """``n`` core-attention modules (4 heads, 2 groups, d = 16) as Megatron builds them, one per layer."""
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from llada_cpt.attention.core import block_diffusion_attention_class

    config = TransformerConfig(num_layers=n, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               kv_channels=16, attention_dropout=0.0, use_cpu_initialization=True)
    groups = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1), cp=None)
    cls = block_diffusion_attention_class("reference", 500000.0, scaling)
    return [cls(config, i + 1, AttnMaskType.no_mask, "self", pg_collection=groups) for i in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "llama3-scaling"])
def test_attention_rope_once_per_layout_equals_eager_per_layer(monkeypatch, dtype, scaled):
    """cos/sin are computed once per layout for all layers, and every layer's output is bit-equal to the
    eager path that recomputes positions and cos/sin per layer; the output is a view (no copy)."""
    from llada_cpt.attention import rope
    from llada_cpt.attention.rope import Llama3RopeScaling, apply_rotary, rotary_cos_sin

    scaling = Llama3RopeScaling(original_max_position_embeddings=16) if scaled else None
    layers = _attention_layers(3, scaling)
    calls = []
    monkeypatch.setattr(rope, "rotary_cos_sin", lambda *a, **k: calls.append(1) or rotary_cos_sin(*a, **k))
    rope.ROTARY_CACHE.clear()
    layout = AttentionLayout(doc_ids=_doc_ids(15), block_size=4)
    g = torch.Generator().manual_seed(15)
    s, b = layout.global_index(True).numel(), layout.doc_ids.shape[0]
    for step, layer in enumerate(layers * 2):  # two passes: the forward and a recomputation
        query = torch.randn(s, b, 4, 16, generator=g).to(dtype)
        key, value = (torch.randn(s, b, 2, 16, generator=g).to(dtype) for _ in range(2))
        got = layer(query, key, value, layout)
        cos, sin = rotary_cos_sin(layout.position_ids(local=True), 16, 500000.0, scaling)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (apply_rotary(query, cos, sin), apply_rotary(key, cos, sin), value))
        want = reference_attention(q, k, v, layout, layer.softmax_scale).permute(2, 0, 1, 3).reshape(s, b, 64)
        assert torch.equal(got, want), step
        assert got._is_view()  # [b, h, s, d] -> [s, b, h*d] without a copy
    assert len(calls) == 1
    other = AttentionLayout(doc_ids=_doc_ids(16), block_size=4)
    layers[0](query, key, value, other)
    assert len(calls) == 2  # a new micro-batch's layout: new tables


def test_attention_rejects_a_layout_of_other_length():
    layer, = _attention_layers(1)
    layout = AttentionLayout(doc_ids=_doc_ids(17), block_size=4)
    q = torch.randn(2 * L - 2, 2, 4, 16)
    with pytest.raises(ValueError, match=f"{2 * L} local tokens"):
        layer(q, q[:, :, :2], q[:, :, :2], layout)


# ----------------------------------------------------------------------------- additive bias (cuDNN, TE)


@pytest.mark.parametrize("length,block", [(L, 4), (21, 3)], ids=["aligned", "padded-rows"])
def test_additive_bias_attention_matches_reference_with_gradients(length, block):
    """SDPA with the cuDNN/TE bias (here on the math kernel) = reference, outputs and input gradients."""
    layout = AttentionLayout(doc_ids=_doc_ids(8, length=length), block_size=block)
    bias = kbias.additive_mask(layout, torch.float32, torch.device("cpu"))
    sk = layout.global_index(False).numel()
    assert bias.shape == (2, 1, sk, sk) and bias.stride(-2) % 8 == 0
    assert torch.equal(bias == 0, layout.dense_mask())
    q, k, v = (t.requires_grad_(True) for t in _qkv(layout, hq=2, hkv=2, seed=2))
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    want = reference_attention(q, k, v, layout, 0.3)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_masked_out_tensor_is_the_complement():
    layout = AttentionLayout(doc_ids=_doc_ids(9), block_size=4).with_local_positions(zigzag_positions(L, 2, 0))
    assert torch.equal(kbias.masked_out_for(layout, torch.device("cpu")), ~layout.dense_mask())


def test_cudnn_backend_on_cpu_names_the_fix():
    layout = AttentionLayout(doc_ids=_doc_ids(10), block_size=4)
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*reference"):
        kcudnn.cudnn_attention_backend(*_qkv(layout), layout, 0.3)


def test_missing_transformer_engine_error(monkeypatch):
    """Without TE, the te backend and the registry raise one ConfigError naming install / NGC / other backends."""
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # makes `import transformer_engine` fail
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    kte._import_error.cache_clear()
    try:
        layout = AttentionLayout(doc_ids=_doc_ids(11), block_size=4)
        with pytest.raises(ConfigError) as err:
            kte.te_attention_backend(*_qkv(layout), layout, 0.3)
        message = str(err.value)
        for needle in ("Transformer Engine", "transformer_engine[pytorch]", "NGC", "flex", "reference"):
            assert needle in message
        with pytest.raises(ConfigError, match="NGC"):
            registry.resolve("te")
        assert "te" not in registry.register_backends({})
    finally:
        kte._import_error.cache_clear()


# ----------------------------------------------------------------------------- registry and auto


def test_auto_on_cpu_is_reference_and_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(registry, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="llada_cpt.kernels.registry"):
        first = registry.auto_choice(torch.device("cpu"))
        second = registry.auto_choice(torch.device("cpu"))
    assert first == second == "reference"
    assert [r.getMessage() for r in caplog.records].count("attention backend auto -> reference on cpu") == 1
    assert registry.resolve("auto", device=torch.device("cpu")) is reference_attention
    registered = {}
    assert registry.register_backends(registered, device=torch.device("cpu")) == {} == registered


def test_auto_order_override(monkeypatch):
    monkeypatch.setenv("LLADA_ATTENTION_AUTO_ORDER", "cudnn,flex")
    assert registry.auto_order() == ("cudnn", "flex", "reference")
    monkeypatch.setenv("LLADA_ATTENTION_AUTO_ORDER", "cudnn,fast")
    with pytest.raises(ConfigError, match="fast"):
        registry.auto_order()


def test_attention_module_resolves_through_the_registry():
    """``llada_cpt.attention.core`` hands fused names and ``auto`` to the registry: same checks, same errors."""
    core = pytest.importorskip("llada_cpt.attention.core")
    assert core.resolve_backend("auto") is reference_attention
    with pytest.raises(ConfigError, match="no backward pass on CPU"):
        core.resolve_backend("flex")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        core.resolve_backend("cudnn")
    assert "flex" not in core.ATTENTION_BACKENDS and "cudnn" not in core.ATTENTION_BACKENDS


# ----------------------------------------------------------------------------- per-step cache


def test_layout_cache_hits_same_tensors_and_misses_changes():
    cache = LayoutCache(maxsize=4)
    doc = _doc_ids(12)
    built = []

    def get(layout):
        return cache.get(layout, ("cpu",), lambda: built.append(layout) or len(built))

    layout = AttentionLayout(doc_ids=doc, block_size=4)
    assert get(layout) == 1 and get(layout) == 1
    assert get(AttentionLayout(doc_ids=doc, block_size=4)) == 1  # same tensors, new layout object
    assert (cache.hits, cache.misses) == (2, 1)
    assert get(dataclasses.replace(layout, block_size=8)) == 2  # other block size
    assert get(dataclasses.replace(layout, mdlm=True)) == 3
    assert get(layout.with_local_positions(zigzag_positions(L, 2, 0))) == 4
    doc.add_(0)  # in-place write: contents may have changed
    assert get(layout) == 5
    assert cache.misses == 5 and len(cache) == 4  # LRU bound


def test_layout_cache_never_serves_another_tensors_entry(monkeypatch):
    """A freed ``doc_ids`` whose id and memory are reused by the next step's tensor must not hit.

    The reuse is forced by making every tensor's cheap key equal; the weak
    reference to the cached tensor object is what tells them apart.
    """
    import llada_cpt.kernels.layout_cache as lc

    monkeypatch.setattr(lc, "_tensor_key", lambda t: None if t is None else "reused address")
    cache = LayoutCache(maxsize=4)
    kept = torch.zeros(1, L, dtype=torch.long)
    assert cache.get(AttentionLayout(doc_ids=kept, block_size=4), (), lambda: "kept") == "kept"
    for step in range(3):
        doc = torch.full((1, L), step, dtype=torch.long)
        assert cache.get(AttentionLayout(doc_ids=doc, block_size=4), (), lambda: step) == step
        del doc
        gc.collect()
    assert cache.misses == 4 and cache.hits == 0
    # the colliding key now belongs to a dead tensor: `kept` is rebuilt, not served step 2's value
    assert cache.get(AttentionLayout(doc_ids=kept, block_size=4), (), lambda: "rebuilt") == "rebuilt"


def test_layout_cache_drops_entries_of_dead_tensors():
    """A finished step's masks are released on the next call, not kept until LRU eviction."""
    cache = LayoutCache(maxsize=8)
    for step in range(3):
        doc = torch.full((1, L), step, dtype=torch.long)
        cache.get(AttentionLayout(doc_ids=doc, block_size=4), (), lambda: step)
        del doc
        gc.collect()
    live = torch.zeros(1, L, dtype=torch.long)
    cache.get(AttentionLayout(doc_ids=live, block_size=4), (), lambda: "live")
    assert len(cache) == 1


def test_flex_block_mask_cache_per_layout():
    flex.BLOCK_MASK_CACHE.clear()
    doc = _doc_ids(13)
    layout = AttentionLayout(doc_ids=doc, block_size=4)
    first = flex.block_mask_for(layout, torch.device("cpu"))
    assert flex.block_mask_for(AttentionLayout(doc_ids=doc, block_size=4), torch.device("cpu")) is first
    other = flex.block_mask_for(dataclasses.replace(layout, block_size=8), torch.device("cpu"))
    assert other is not first
    assert (flex.BLOCK_MASK_CACHE.hits, flex.BLOCK_MASK_CACHE.misses) == (1, 2)


# ----------------------------------------------------------------------------- benchmark script


def test_bench_target_verdicts():
    """PASS/FAIL of both targets from measured numbers, and the lower bound when unfused runs out of memory."""
    from types import SimpleNamespace

    bench = load_script("kernels/bench_attention.py")
    Case, Result, check_targets, suggested_auto_order = (
        bench.Case, bench.Result, bench.check_targets, bench.suggested_auto_order)

    args = SimpleNamespace(batch=1, heads=16)
    cases = [Case(8192, "32", "packed", 16384, 16384, tile_fraction=0.25, dense_ms=100.0),
             Case(8192, "L", "one", 8192, 8192, tile_fraction=1.0, dense_ms=30.0)]
    results = [
        Result(0, "unfused", "fwd+bwd", "ok", ms=900.0, peak_mib=40000.0),
        Result(0, "flex", "fwd+bwd", "ok", ms=30.0, peak_mib=900.0),  # 2.3% of unfused; 30 <= 1.25*100*0.25
        Result(0, "cudnn", "fwd+bwd", "ok", ms=90.0, peak_mib=4500.0),  # 11%: fails memory
        Result(1, "unfused", "fwd+bwd", "OOM"),
        Result(1, "flex", "fwd+bwd", "ok", ms=40.0, peak_mib=100.0),  # 40 > 1.25 * 30
        Result(1, "cudnn", "-", "unavailable: no GPU"),
    ]
    verdicts = {(v["case"], v["target"].split()[0], v["target"].split()[1]): v for v in check_targets(cases, results, args)}
    one, two = "L=8192 B=32 docs=packed", "L=8192 B=L docs=one"
    assert verdicts[(one, "memory", "flex")]["verdict"] == "PASS"
    assert verdicts[(one, "memory", "cudnn")]["verdict"] == "FAIL"
    assert verdicts[(one, "speed", "best")]["verdict"] == "PASS"
    assert "flex" in verdicts[(one, "speed", "best")]["detail"]
    assert verdicts[(two, "memory", "flex")]["verdict"] == "PASS"  # 100 MiB vs the 16*8192^2*2 B lower bound
    assert "lower bound" in verdicts[(two, "memory", "flex")]["detail"]
    assert verdicts[(two, "memory", "cudnn")]["verdict"] == "n/a"
    assert verdicts[(two, "speed", "best")]["verdict"] == "FAIL"
    assert suggested_auto_order(results) == "flex,cudnn,reference"  # ranked on the case both ran


def test_bench_attention_smoke_writes_results(tmp_path):
    import json

    main = load_script("kernels/bench_attention.py").main

    assert main(["--smoke", "--block-sizes", "8", "--docs", "packed", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "attention_smoke.json").read_text())
    status = {r["backend"]: (r["mode"], r["status"]) for r in data["results"]}
    assert status["unfused"] == status["reference"] == ("fwd+bwd", "ok")
    assert status["flex"] == ("fwd", "ok")  # forward only on CPU
    assert status["cudnn"][1].startswith("unavailable")
    assert data["environment"]["torch"] == torch.__version__
    assert 0 < data["cases"][0]["tile_fraction"] < 1
    assert "| flex | fwd |" in (tmp_path / "attention_smoke.md").read_text()


def _train_step_smoke(rank: int, world_size: int, out_dir: str) -> dict:
    """In a spawned rank: Megatron's CPU patches stay out of the pytest process."""
    import json
    from pathlib import Path

    train_step = load_script("benchmarks/train_step.py")
    code = train_step.main(["--smoke", "--block-sizes", "8", "L", "--backends", "reference", "flex", "--out", out_dir])
    return {"code": code, "data": json.loads((Path(out_dir) / "train_step_smoke.json").read_text())}


def test_train_step_smoke_trains_with_reference_and_reports_the_rest(tmp_path):
    from dist import run_distributed

    (result,) = run_distributed(_train_step_smoke, 1, str(tmp_path))
    assert result["code"] == 0
    rows = {(r["backend"], r["block"]): r for r in result["data"]["rows"]}
    for block in ("8", "L"):
        ok = rows[("reference", block)]
        assert ok["status"] == "ok" and ok["tokens_per_s"] > 0 and math.isfinite(ok["loss"])
        assert ok["input_tokens_per_s"] == pytest.approx(ok["tokens_per_s"] * (1 if block == "L" else 2))
        assert rows[("flex", block)]["status"].startswith("unavailable: FlexAttention has no backward")
    assert result["data"]["model"]["params"] > 0

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
from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.errors import ConfigError
from llada_cpt.kernels.reference import reference_attention
from llada_cpt.parallel.context import zigzag_positions

flex = pytest.importorskip("llada_cpt.kernels.flex")
if flex.flex_attention is None:
    pytest.skip("this torch has no FlexAttention", allow_module_level=True)

from torch.nn.attention.flex_attention import create_block_mask, create_mask  # noqa: E402

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


BLOCK_MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


@pytest.mark.parametrize("tile", [8, (8, 4), 5], ids=["8x8", "8x4", "5x5-edge-tiles"])
@pytest.mark.parametrize("name,layout", LAYOUTS, ids=IDS)
def test_closed_form_block_mask_equals_create_block_mask(name, layout, tile):
    """Counted in closed form (no dense mask, no argsort) = torch's ``create_block_mask``, tensor for tensor.

    Covers BDLM B = 1/4/L, MDLM, causal, CP local queries, non-square tiles and
    tiles cut by the sequence end (never full).
    """
    sq, sk = layout.global_index(True).numel(), layout.global_index(False).numel()
    mask_mod = flex.bdlm_mask_mod(layout, torch.device("cpu"))
    pair = (tile, tile) if isinstance(tile, int) else tile
    want = create_block_mask(mask_mod, layout.doc_ids.shape[0], None, sq, sk, device="cpu", BLOCK_SIZE=pair)
    got = flex.build_block_mask(layout, torch.device("cpu"), tile=tile)
    assert got.BLOCK_SIZE == want.BLOCK_SIZE and got.seq_lengths == want.seq_lengths == (sq, sk)
    for field in BLOCK_MASK_FIELDS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert got.mask_mod is not None


def test_ordered_blocks_is_the_stable_descending_argsort():
    from llada_cpt.kernels.block_mask import ordered_blocks

    flags = torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(0)) < 0.3
    num, idx = ordered_blocks(flags)
    assert torch.equal(num[:, 0], flags.sum(-1).int())
    assert torch.equal(idx[:, 0], torch.argsort(flags.int(), dim=-1, descending=True, stable=True).int())


def _reference_tiles(layout: AttentionLayout, tile: int = 128, rows: int = 1024):
    """``(non-empty, full)`` ``[nq, nk]`` of ``layout.dense_mask()`` (batch 1).

    A query's mask row depends only on its (document, block, half), so the
    binding rule is evaluated once per distinct triple (a few hundred rows at
    B = 32; every row at B = 1), a chunk at a time.
    """
    q_index, k_index = layout.global_index(True), layout.global_index(False)
    doc, blk, noised = layout._attributes(q_index)
    _, first, inverse = _unique_rows(torch.stack([doc[0], blk[0], noised.long()], dim=1))
    nk = k_index.numel() // tile
    per_key_tile = torch.cat([  # [unique rows, nk], one chunk of [rows, Sk] at a time
        layout.allowed(q_index[first[i:i + rows]], k_index)[0].view(-1, nk, tile).sum(-1, dtype=torch.int32)
        for i in range(0, first.numel(), rows)])
    counts = per_key_tile[inverse].view(-1, tile, nk).sum(1)
    return counts > 0, counts == tile * tile


def _unique_rows(keys: torch.Tensor):
    """``(unique, index of each one's first row, inverse)`` of the rows of ``keys``."""
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((unique.shape[0],), keys.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(keys.shape[0]), reduce="amin")
    return unique, first, inverse


@pytest.mark.parametrize("block", ["1", "32", "2048", "MDLM"])
def test_block_mask_at_8192_densifies_to_the_reference_mask(block):
    """L = 8192 (2L = 16384 rows), packed documents: the BlockMask built in milliseconds equals the
    binding mask tile for tile (non-empty and full tiles), and densifies (full tiles, partial tiles
    through the mask_mod) to exactly the reference mask."""
    from llada_cpt.parallel.work import random_document_ids

    length = 8192
    doc = random_document_ids(length, torch.Generator().manual_seed(8192), min_len=16, max_len=3000)[None]
    assert doc.max() > 2  # several documents, starts not aligned to the blocks
    mdlm = block == "MDLM"
    layout = AttentionLayout(doc_ids=doc, block_size=length if mdlm else int(block), mdlm=mdlm)
    flex.BLOCK_MASK_CACHE.clear()
    bm = flex.block_mask_for(layout, torch.device("cpu"))
    sq = layout.global_index(True).numel()
    nk = sq // 128
    want_any, want_all = _reference_tiles(layout)
    assert torch.equal(bm.to_dense()[0, 0].bool(), want_any)
    full = _blocks(bm.full_kv_num_blocks, bm.full_kv_indices, nk)[0]
    assert torch.equal(full, want_all)
    assert 0 < int(want_any.sum()) < want_any.numel()
    # densified at full resolution for a band of query tiles across both halves
    mask_mod = bm.mask_mod
    for qt in (0, nk // 4 + 1, nk // 2 - 1, nk // 2, nk - 1):
        rows = torch.arange(qt * 128, (qt + 1) * 128).view(-1, 1)
        keys = torch.arange(sq).view(1, -1)
        tile_any = want_any[qt].repeat_interleave(128).view(1, -1)
        tile_full = full[qt].repeat_interleave(128).view(1, -1)
        dense = tile_full | (tile_any & mask_mod(torch.tensor(0), torch.tensor(0), rows, keys))
        assert torch.equal(dense, layout.allowed(layout.global_index(True)[rows[:, 0]], layout.global_index(False))[0])


def test_flex_options_from_environment(monkeypatch):
    """The benchmark knobs: tile shapes, the mask builder, the compile mode; bad values name the fix."""
    for key in ("LLADA_FLEX_TILE", "LLADA_FLEX_BLOCK_MASK", "LLADA_FLEX_COMPILE_MODE", "LLADA_FLEX_KERNEL_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    assert flex.FlexOptions.from_env() == flex.FlexOptions()
    assert flex.FlexOptions().tile == (128, 128) and flex.FlexOptions().kernel_options() is None
    monkeypatch.setenv("LLADA_FLEX_TILE", "128x64")
    monkeypatch.setenv("LLADA_FLEX_COMPILE_MODE", "max-autotune-no-cudagraphs")
    monkeypatch.setenv("LLADA_FLEX_BLOCK_MASK", "create_block_mask")
    options = flex.FlexOptions.from_env()
    assert options.tile == (128, 64) and options.compile_mode == "max-autotune-no-cudagraphs"
    assert options.block_mask == "create_block_mask"
    monkeypatch.setenv("LLADA_FLEX_TILE", "64")
    assert flex.FlexOptions.from_env().tile == (64, 64)
    for bad, needle in (("big", "128x64"), ("100x64", "multiples of 16"), ("0", "128x64")):
        monkeypatch.setenv("LLADA_FLEX_TILE", bad)
        with pytest.raises(ConfigError, match=needle):
            flex.FlexOptions.from_env()
    monkeypatch.delenv("LLADA_FLEX_TILE")
    monkeypatch.setenv("LLADA_FLEX_BLOCK_MASK", "argsort")
    with pytest.raises(ConfigError, match="closed_form"):
        flex.FlexOptions.from_env()
    monkeypatch.delenv("LLADA_FLEX_BLOCK_MASK")
    monkeypatch.setenv("LLADA_FLEX_KERNEL_BACKEND", "cutlass")
    with pytest.raises(ConfigError, match="FLASH"):
        flex.FlexOptions.from_env()
    monkeypatch.setenv("LLADA_FLEX_KERNEL_BACKEND", "flash")
    options = flex.FlexOptions.from_env()
    assert options.kernel_backend == "FLASH"
    if flex.flash_backend_unavailable_reason() is not None:  # no FlashAttention-4 here: one clear error
        with pytest.raises(ConfigError, match="LLADA_FLEX_KERNEL_BACKEND"):
            options.kernel_options()


def test_flex_forward_with_non_square_tiles_and_builders(monkeypatch):
    """The flex backend honours LLADA_FLEX_TILE / LLADA_FLEX_BLOCK_MASK (cached per tile and builder)."""
    layout = AttentionLayout(doc_ids=_doc_ids(14, length=64), block_size=8)
    q, k, v = _qkv(layout)
    want = reference_attention(q, k, v, layout, 0.3)
    flex.BLOCK_MASK_CACHE.clear()
    for tile, builder in (("32x16", "closed_form"), ("32", "create_block_mask"), ("16x32", "closed_form")):
        monkeypatch.setenv("LLADA_FLEX_TILE", tile)
        monkeypatch.setenv("LLADA_FLEX_BLOCK_MASK", builder)
        torch.testing.assert_close(flex.flex_attention_backend(q, k, v, layout, 0.3), want, rtol=1e-5, atol=1e-5)
    assert flex.BLOCK_MASK_CACHE.misses == 3


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
    monkeypatch.setenv("LLADA_ROPE_CACHE", "0")  # the benchmark's baseline: per-layer recomputation
    assert torch.equal(layers[1](query, key, value, layout), got)
    assert len(calls) == 3


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
    verdicts = {(v["case"], v["target"].split()[0], v["target"].split()[1]): v
                for v in check_targets(cases, results, args)}
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

    argv = ["--smoke", "--block-sizes", "8", "--docs", "packed", "--flex-variants", "32x16", "create_block_mask",
            "--cp-size", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "attention_smoke.json").read_text())
    status = {r["backend"]: (r["mode"], r["status"]) for r in data["results"]}
    assert status["unfused"] == status["reference"] == ("fwd+bwd", "ok")
    assert status["flex"] == status["flex[32x16]"] == status["flex[create_block_mask]"] == ("fwd", "ok")
    assert status["flex cp2 rank 0"] == status["flex cp2 rank 1"] == ("fwd", "ok")  # issue 21's per-rank timing
    assert status["cudnn"][1].startswith("unavailable")
    assert all(r["mask_build_ms"] is not None for r in data["results"] if r["backend"].startswith("flex["))
    assert data["environment"]["torch"] == torch.__version__
    assert 0 < data["cases"][0]["tile_fraction"] < 1
    assert "| flex | fwd |" in (tmp_path / "attention_smoke.md").read_text()


def test_bench_attention_rejects_unknown_flex_variant(capsys):
    main = load_script("kernels/bench_attention.py").main
    with pytest.raises(SystemExit) as exit_:
        main(["--smoke", "--flex-variants", "64x64+turbo"])
    assert exit_.value.code == 2 and "turbo" in capsys.readouterr().err


GPU_CHECKS = "kernels/gpu_checks.sh"


def _gpu_check_steps() -> list[str]:
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert subprocess.run(["bash", "-n", str(root / GPU_CHECKS)]).returncode == 0
    out = subprocess.run(["bash", str(root / GPU_CHECKS), "/tmp/unused-gpu-checks-dir", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return re.findall(r"^STEP (\S+) timeout (\d+): (.*)$", out.stdout, flags=re.M)


def test_gpu_checks_script_structure():
    """The prepared GPU script: valid bash, every step under its own `timeout` within an 8-minute budget,
    results collected after every step, and the steps the issue asks for (its CPU dry run)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / GPU_CHECKS).read_text()
    steps = _gpu_check_steps()
    names = [name for name, _, _ in steps]
    assert names[:3] == ["env", "install", "gpu-tests"]
    for needed in ("attention", "train-step", "cli", "attention-16384", "mask-baseline", "autotune"):
        assert needed in names
    assert all(0 < int(limit) <= 150 for _, limit, _ in steps)
    commands = {name: command for name, _, command in steps}
    assert "pytest -m gpu" in commands["gpu-tests"] and "tests/test_kernels_gpu.py" in commands["gpu-tests"]
    assert "--seq-lengths 4096 8192" in commands["attention"] and "unfused flex cudnn" in commands["attention"]
    assert "--cp-size 8" in commands["attention-16384"] and "--seq-lengths 16384" in commands["attention-16384"]
    assert "--micro-batches 8" in commands["train-step"]
    body = text[text.index("step() {"):text.index("install_wheels() {")]
    assert 'timeout -k 10 "$limit" "$@"' in body  # each step wrapped in its own timeout ...
    assert body.rstrip().endswith("collect\n}")  # ... and its results copied to the output folder after it
    assert "BUDGET=${BUDGET:-480}" in text  # ... within ~8 minutes
    assert "pip download --no-deps --python-version 3.12 --only-binary=:all:" in text  # the wheels recipe
    assert "OUTDIR=${OUTDIR:-${OUT:-" in text


def test_gpu_checks_script_runs_a_step_and_writes_partial_results(tmp_path):
    """A real (CPU) run of the env step: summary, log and results archive land in the output folder."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", str(root / GPU_CHECKS), str(tmp_path), "--only", "env"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "| env | 0 |" in summary
    assert f"torch {torch.__version__}" in (tmp_path / "gpu_checks.log").read_text()
    assert (tmp_path / "results.tar.gz").exists()
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back


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

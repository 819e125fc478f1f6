"""Fused attention backends on a GPU: forward output and input gradients against the reference.

Run on a CUDA machine with ``pytest -m gpu tests/test_kernels_gpu.py``; skipped
without CUDA.  A backend whose dependency is missing (TE outside the NGC image)
is skipped with the fix in the reason.  Tolerance: the bf16 error of a backend
against the float32 reference may be at most 3x the error of unfused bf16
attention (plus 1% of the largest value) - a mask error is of the order of
the values themselves.
"""
from __future__ import annotations

import pytest
import torch

from conftest import random_doc_ids
from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.kernels.reference import reference_attention
from llada_cpt.parallel.context import zigzag_positions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with `pytest -m gpu` there)"),
]

from llada_cpt.kernels import registry  # noqa: E402
from llada_cpt.kernels.unfused import unfused_attention  # noqa: E402

L = 256
HEAD_DIM = 128
DEVICE = torch.device("cuda")
BACKENDS = registry.FUSED


def _layout(seed: int, block_size: int, mdlm: bool = False, batch: int = 2) -> AttentionLayout:
    g = torch.Generator().manual_seed(seed)
    doc = torch.stack([random_doc_ids(L, g, max_docs=5) for _ in range(batch)]).to(DEVICE)
    return AttentionLayout(doc_ids=doc, block_size=block_size, mdlm=mdlm)


def _backend(name: str):
    reason = registry.unavailable_reason(name, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    return registry.load(name)


def _inputs(layout: AttentionLayout, hq: int, hkv: int, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    b = layout.doc_ids.shape[0]
    sk = layout.global_index(False).numel()
    q = torch.randn(b, hq, sk, HEAD_DIM, generator=g, device=DEVICE)
    k = torch.randn(b, hkv, sk, HEAD_DIM, generator=g, device=DEVICE)
    v = torch.randn(b, hkv, sk, HEAD_DIM, generator=g, device=DEVICE)
    dout = torch.randn(b, hq, sk, HEAD_DIM, generator=g, device=DEVICE)
    return q, k, v, dout


def _run(fn, q, k, v, dout, layout, scale, cp: int = 1):
    """Output and (dq, dk, dv); with ``cp`` > 1 each emulated rank runs its local queries."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    if cp == 1:
        out = fn(q, k, v, layout, scale)
    else:
        parts = []
        for rank in range(cp):
            local = layout.with_local_positions(zigzag_positions(L, cp, rank).to(DEVICE))
            rows = local.global_index(True)
            part = fn(q[:, :, rows], k, v, local, scale)
            parts.append((rows, part))
        out = torch.cat([p for _, p in parts], dim=2)
        order = torch.cat([r for r, _ in parts])
        out = out[:, :, torch.argsort(order)]
    out.backward(dout.to(out.dtype))
    return out.detach().float(), [t.grad.float() for t in (q, k, v)]


def _check(name, got, gold, base):
    err = (got - gold).abs().max().item()
    base_err = (base - gold).abs().max().item()
    limit = 3 * base_err + 1e-2 * gold.abs().max().item()
    assert err <= limit, f"{name}: max error {err:.3e} > {limit:.3e} (unfused bf16 error {base_err:.3e})"


def _compare(fn, layout, hq, hkv, seed, cp=1):
    q, k, v, dout = _inputs(layout, hq, hkv, seed)
    scale = HEAD_DIM ** -0.5
    gold_out, gold_grads = _run(reference_attention, q, k, v, dout, layout, scale)  # float32
    qb, kb, vb, db = (t.bfloat16() for t in (q, k, v, dout))
    base_out, base_grads = _run(unfused_attention, qb, kb, vb, db, layout, scale)
    out, grads = _run(fn, qb, kb, vb, db, layout, scale, cp=cp)
    _check("out", out, gold_out, base_out)
    for label, g, w, b in zip(("dq", "dk", "dv"), grads, gold_grads, base_grads):
        _check(label, g, w, b)


CASES = [
    ("B1", dict(block_size=1)),
    ("B32", dict(block_size=32)),
    ("BL", dict(block_size=L)),
    ("MDLM", dict(block_size=L, mdlm=True)),
]
SEEDS = {case: i for i, (case, _) in enumerate(CASES)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,kw", CASES, ids=[c for c, _ in CASES])
def test_backend_matches_reference_gqa(backend, case, kw):
    fn = _backend(backend)
    _compare(fn, _layout(SEEDS[case], **kw), hq=8, hkv=2, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_mha(backend):
    fn = _backend(backend)
    _compare(fn, _layout(7, block_size=32), hq=4, hkv=4, seed=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mdlm", [False, True], ids=["B32", "MDLM"])
def test_backend_context_parallel_two_ranks(backend, mdlm):
    """CP = 2 in one process: two local position sets, outputs concatenated, gradients summed."""
    fn = _backend(backend)
    _compare(fn, _layout(11, block_size=L if mdlm else 32, mdlm=mdlm), hq=8, hkv=2, seed=3, cp=2)


def test_flex_does_not_recompile_for_a_new_layout_of_the_same_shape():
    """Every micro-batch brings a new mask_mod closure; it must reuse the compiled kernels."""
    fn = _backend("flex")
    from torch._dynamo.utils import counters

    def call(seed):
        layout = _layout(seed, block_size=32)
        q, k, v, dout = (t.bfloat16() for t in _inputs(layout, 8, 2, seed))
        _run(fn, q, k, v, dout, layout, HEAD_DIM ** -0.5)

    call(21)
    before = counters["stats"]["unique_graphs"]
    call(22)
    call(23)
    assert counters["stats"]["unique_graphs"] == before


def test_auto_picks_the_first_available_backend_of_the_order():
    order = registry.auto_order()
    expected = next(n for n in order if registry.unavailable_reason(n, DEVICE) is None)
    assert registry.auto_choice(DEVICE) == expected
    assert registry.resolve("auto", device=DEVICE) is registry.load(expected)


# ----------------------------------------------------------------------------- closed-form BlockMask, tiles, RoPE


BLOCK_MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


@pytest.mark.parametrize("tile", [128, (128, 64)], ids=["128x128", "128x64"])
@pytest.mark.parametrize("case,kw", CASES, ids=[c for c, _ in CASES])
def test_closed_form_block_mask_equals_create_block_mask_on_cuda(case, kw, tile):
    """On this torch (the GPU image's), tensor for tensor, incl. a CP rank's local queries."""
    _backend("flex")
    from torch.nn.attention.flex_attention import create_block_mask

    from llada_cpt.kernels import flex

    layout = _layout(SEEDS[case], **kw)
    for lay in (layout, layout.with_local_positions(zigzag_positions(L, 2, 1).to(DEVICE))):
        sq, sk = lay.global_index(True).numel(), lay.global_index(False).numel()
        mask_mod = flex.bdlm_mask_mod(lay, DEVICE)
        pair = (tile, tile) if isinstance(tile, int) else tile
        want = create_block_mask(mask_mod, lay.doc_ids.shape[0], None, sq, sk, device=DEVICE, BLOCK_SIZE=pair)
        got = flex.build_block_mask(lay, DEVICE, tile=tile)
        for field in BLOCK_MASK_FIELDS:
            assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_closed_form_block_mask_builds_in_milliseconds_at_8192():
    """L = 8192 (2L = 16384 rows), packed documents: no compile, a few milliseconds (target <= 20 ms)."""
    _backend("flex")
    import time

    from llada_cpt.kernels import flex
    from llada_cpt.parallel.work import random_document_ids

    doc = random_document_ids(8192, torch.Generator().manual_seed(0), 16, 3000)[None].to(DEVICE)
    layout = AttentionLayout(doc_ids=doc, block_size=32)
    flex.build_block_mask(layout, DEVICE)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        flex.build_block_mask(layout, DEVICE)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / 5 * 1e3
    print(f"closed-form BlockMask at L = 8192, B = 32: {ms:.2f} ms")
    assert ms < 100, f"{ms:.1f} ms"


@pytest.mark.parametrize("tile", ["128x64", "64"])
def test_flex_with_other_tiles_matches_reference(monkeypatch, tile):
    """Smaller tiles (with max-autotune: on an H100 torch's default backward config needs 128-key tiles)."""
    fn = _backend("flex")
    monkeypatch.setenv("LLADA_FLEX_TILE", tile)
    monkeypatch.setenv("LLADA_FLEX_COMPILE_MODE", "max-autotune-no-cudagraphs")
    _compare(fn, _layout(31, block_size=32), hq=8, hkv=2, seed=4)


def test_compiled_rope_equals_eager():
    """RoPE compiled on CUDA = the eager chain (fp32 exactly up to fma; bf16 within its rounding)."""
    from llada_cpt.attention import rope

    layout = _layout(41, block_size=32)
    s, b = layout.global_index(True).numel(), layout.doc_ids.shape[0]
    for dtype, tol in ((torch.float32, dict(rtol=1e-6, atol=1e-6)), (torch.bfloat16, {})):
        g = torch.Generator(device=DEVICE).manual_seed(0)
        query = torch.randn(s, b, 8, HEAD_DIM, generator=g, device=DEVICE, dtype=dtype)
        key = torch.randn(s, b, 2, HEAD_DIM, generator=g, device=DEVICE, dtype=dtype)
        tables = rope.rotary_tables(layout, True, HEAD_DIM, 1e6, None, DEVICE, dtype)
        got = rope.rotate_qk(query, key, tables, tables)
        want = rope._rotate_pair(query, key, *tables, *tables)
        for g_, w in zip(got, want):
            torch.testing.assert_close(g_, w, **tol)


def test_flex_output_keeps_the_query_memory_order():
    """[s, b, h, d]-ordered queries give a flex output whose [s, b, h*d] form is a view (no copy in core.py)."""
    fn = _backend("flex")
    layout = _layout(51, block_size=32)
    s, b = layout.global_index(True).numel(), layout.doc_ids.shape[0]
    q, k, v = (torch.randn(s, b, h, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16).permute(1, 2, 0, 3)
               for h in (8, 2, 2))
    out = fn(q, k, v, layout, HEAD_DIM ** -0.5)
    assert out.permute(2, 0, 1, 3).is_contiguous()

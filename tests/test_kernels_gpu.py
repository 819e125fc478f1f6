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
from llada_cpt.attention.reference import reference_attention
from llada_cpt.diffusion.layout import AttentionLayout
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

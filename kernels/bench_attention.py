"""Attention benchmark: every backend vs unfused attention on the block-diffusion mask.

For each sequence length L, block size (B, or L = MDLM: the x_t copy alone) and
packing (one document / packed documents), measures per backend the fwd+bwd
time (warm mask cache: the per-layer cost), the peak memory of one cold fwd+bwd
(mask structures included), the mask build time and the first call with a new
layout of the same shape (a FlexAttention recompile would show there), plus
dense non-causal fused attention (SDPA, no mask) of the same shape and the
fraction of non-empty 128x128 tiles.  Checks the targets:

- memory: cudnn and flex use <= 10% of the unfused attention memory at the largest L;
- speed: the best fused backend's fwd+bwd <= 1.25 x dense fused time x non-empty tile fraction.

    python kernels/bench_attention.py                 # GPU: L = 4096, 8192; B = 32, 64, L
    python kernels/bench_attention.py --smoke         # CPU: tiny shapes, checks the script runs
    python kernels/bench_attention.py --flex-variants 128x64 max-autotune create_block_mask
    python kernels/bench_attention.py --seq-lengths 16384 --block-sizes 32 --backends flex --cp-size 8

``--flex-variants`` adds FlexAttention rows with other settings in the same
process (``flex[128x64]``: query x key tile; ``flex[max-autotune]``: compile mode
``max-autotune-no-cudagraphs``; ``flex[create_block_mask]``: torch's compiled
BlockMask builder, the previous path; ``flex[FLASH]``: the FlashAttention-4
kernel backend; combine with ``+``).  ``--cp-size N`` times flex fwd+bwd for the
local queries of each of N simulated context-parallel ranks (the training's
own split) against all keys: the per-rank balance of the attention work.

Writes ``benchmarks/results/attention.md`` and ``.json`` (``attention_smoke.*``
with ``--smoke``) with device, versions and date.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llada_cpt.benchmarking import environment, status_cell, unavailable_notes, write_atomic  # noqa: E402
from llada_cpt.diffusion.layout import AttentionLayout  # noqa: E402
from llada_cpt.kernels import bias as kbias  # noqa: E402
from llada_cpt.kernels import registry  # noqa: E402
from llada_cpt.kernels.tiles import tile_occupancy  # noqa: E402
from llada_cpt.kernels.unfused import unfused_attention  # noqa: E402
from llada_cpt.parallel.work import random_document_ids  # noqa: E402

MEMORY_TARGET = 0.10  # fused attention memory / unfused, at the largest L
SPEED_TARGET = 1.25  # best fused fwd+bwd / (dense fused x non-empty tile fraction)
MEMORY_CHECKED = ("cudnn", "flex")
FLEX_VARIANTS = {  # --flex-variants item -> environment of llada_cpt.kernels.flex.FlexOptions
    "max-autotune": {"LLADA_FLEX_COMPILE_MODE": "max-autotune-no-cudagraphs"},
    "create_block_mask": {"LLADA_FLEX_BLOCK_MASK": "create_block_mask"},
    "FLASH": {"LLADA_FLEX_KERNEL_BACKEND": "FLASH"},
}
KERNEL_PACKAGES = ("triton", "transformer-engine", "nvidia-cudnn-frontend")  # versions in the header


@dataclasses.dataclass
class Case:
    seq_length: int
    block: str  # "32", "64", or "L" (MDLM)
    docs: str  # "one" | "packed"
    sq: int
    sk: int
    tile_fraction: float
    dense_ms: Optional[float] = None


@dataclasses.dataclass
class Result:
    case: int  # index into the cases
    backend: str
    mode: str  # "fwd+bwd" or "fwd" (backends without a backward on this device)
    status: str  # "ok", "OOM", "unavailable: ...", "error: ..."
    ms: Optional[float] = None
    peak_mib: Optional[float] = None
    mask_build_ms: Optional[float] = None
    new_layout_ms: Optional[float] = None


def flex_variant_env(variant: str) -> dict[str, str]:
    """Environment of one ``--flex-variants`` item (``+``-joined parts: a tile ``NxM`` or a FLEX_VARIANTS key)."""
    env: dict[str, str] = {}
    for part in variant.split("+"):
        if re.fullmatch(r"\d+(x\d+)?", part):
            env["LLADA_FLEX_TILE"] = part
        elif part in FLEX_VARIANTS:
            env.update(FLEX_VARIANTS[part])
        else:
            raise ValueError(f"--flex-variants: `{part}` is neither a tile (128x64) nor one of {sorted(FLEX_VARIANTS)}")
    return env


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _with_environ(fn: Callable, env: dict[str, str]) -> Callable:
    def call(*args, **kwargs):
        with _environ(env):
            return fn(*args, **kwargs)

    return call


def _variant_env(name: str) -> dict[str, str]:
    """The environment of a ``flex[...]`` backend row ({} for the others)."""
    return flex_variant_env(name[5:-1]) if name.startswith("flex[") else {}


def _backends(device: torch.device, flex_variants=()) -> dict[str, tuple[Callable, Optional[str]]]:
    """name -> (callable, reason it cannot train here or None)."""
    out: dict[str, tuple[Callable, Optional[str]]] = {"unfused": (unfused_attention, None)}
    out["reference"] = (registry.load("reference"), None)
    for name in registry.FUSED:
        reason = registry.unavailable_reason(name, device)
        fn = None
        try:
            fn = registry.load(name)
        except Exception as exc:  # an import failure is just another reason
            reason = reason or f"{type(exc).__name__}: {exc}"
        out[name] = (fn, reason)
        if name == "te" and fn is not None:
            from llada_cpt.kernels.te import make_te_backend

            out["te-unfused"] = (make_te_backend("arbitrary"), reason)
    if "flex" in out:
        fn, reason = out["flex"]
        for variant in flex_variants:
            env = flex_variant_env(variant)
            extra = None
            if env.get("LLADA_FLEX_KERNEL_BACKEND") == "FLASH" and reason is None:
                from llada_cpt.kernels.flex import flash_backend_unavailable_reason

                extra = flash_backend_unavailable_reason()
            out[f"flex[{variant}]"] = (None if fn is None else _with_environ(fn, env), reason or extra)
    return out


def _forward_only_ok(name: str, reason: Optional[str], device: torch.device) -> bool:
    """FlexAttention runs forward (eager) on CPU: the smoke run still exercises it."""
    return name.split("[")[0] == "flex" and device.type == "cpu" and reason is not None and "CPU" in reason


def make_layout(seq_length: int, block: str, docs: str, batch: int, seed: int, device: torch.device) -> AttentionLayout:
    g = torch.Generator().manual_seed(seed)
    if docs == "one":
        doc = torch.zeros(batch, seq_length, dtype=torch.long)
    else:
        hi = max(16, min(3000, seq_length // 2))
        doc = torch.stack([random_document_ids(seq_length, g, min_len=min(16, hi), max_len=hi) for _ in range(batch)])
    mdlm = block == "L"
    size = seq_length if mdlm else int(block)
    return AttentionLayout(doc_ids=doc.to(device), block_size=size, mdlm=mdlm)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_mask_caches() -> None:
    kbias.BIAS_CACHE.clear()
    try:
        from llada_cpt.kernels.flex import BLOCK_MASK_CACHE

        BLOCK_MASK_CACHE.clear()
    except ImportError:
        pass


def _step(fn, q, k, v, dout, layout, scale, backward: bool) -> None:
    if backward:
        out = fn(q, k, v, layout, scale)
        out.backward(dout)
        for t in (q, k, v):
            t.grad = None
    else:  # forward-only backends (FlexAttention on CPU) also refuse inputs that require grad
        with torch.no_grad():
            fn(q.detach(), k.detach(), v.detach(), layout, scale)


def _time(call: Callable[[], None], device: torch.device, iters: int) -> float:
    """Mean milliseconds of ``call`` over ``iters`` runs."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            call()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - t0) * 1e3 / iters


def _peak_mib(call: Callable[[], None], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _inputs(layout: AttentionLayout, args, device, dtype, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    b = layout.doc_ids.shape[0]
    sq, sk = layout.global_index(True).numel(), layout.global_index(False).numel()
    q = torch.randn(b, args.heads, sq, args.head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(b, args.kv_heads, sk, args.head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(b, args.kv_heads, sk, args.head_dim, generator=g, device=device, dtype=dtype)
    dout = torch.randn(b, args.heads, sq, args.head_dim, generator=g, device=device, dtype=dtype)
    return [t.requires_grad_(True) for t in (q, k, v)] + [dout]


def _dense_fused(q, k, v, layout, scale):
    """Non-causal fused attention without a mask (SDPA picks flash/cuDNN on GPU): the speed yardstick."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _error_status(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "OOM"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {first[:160]}"


def run_case(case_index: int, case: Case, layout: AttentionLayout, backends, args, device, dtype) -> list[Result]:
    scale = 1.0 / math.sqrt(args.head_dim)
    q, k, v, dout = _inputs(layout, args, device, dtype)
    results = []
    try:
        dense = lambda: _step(_dense_fused, q, k, v, dout, layout, scale, True)  # noqa: E731
        for _ in range(args.warmup):
            dense()
        case.dense_ms = _time(dense, device, args.iters)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        print(f"  dense fused: {_error_status(exc)}")
    for name, (fn, reason) in backends.items():
        backward = True
        if reason is not None:
            if not _forward_only_ok(name, reason, device):
                results.append(Result(case_index, name, "-", f"unavailable: {reason}"))
                continue
            backward = False
        mode = "fwd+bwd" if backward else "fwd"
        res = Result(case_index, name, mode, "ok")
        step = lambda lay=layout: _step(fn, q, k, v, dout, lay, scale, backward)  # noqa: E731
        phase = _Phases(name)  # printed as they start: a run killed by a time limit still shows where it was
        try:
            _clear_mask_caches()
            with phase("cold fwd+bwd (mask build, compile)"):
                res.peak_mib = _peak_mib(step, device)  # cold: includes building the mask structure
            with phase(f"{args.warmup} warm-up + {args.iters} timed"):
                for _ in range(args.warmup):
                    step()
                res.ms = _time(step, device, args.iters)
            _clear_mask_caches()
            with phase("mask build"):
                res.mask_build_ms = _time(lambda: _build_mask(name, layout, q), device, 1)
            fresh = make_layout(case.seq_length, case.block, case.docs, layout.doc_ids.shape[0], 99, device)
            with phase("new layout"):
                res.new_layout_ms = _time(lambda: _step(fn, q, k, v, dout, fresh, scale, backward), device, 1)
        except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others
            res.status = _error_status(exc)
        finally:
            for t in (q, k, v):
                t.grad = None
            _clear_mask_caches()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(res)
        print(f"  {name:11s} {mode:7s} {res.status:4s} "
              + (f"{res.ms:9.2f} ms" if res.ms is not None else "")
              + (f"  {res.peak_mib:9.1f} MiB" if res.peak_mib is not None else ""), flush=True)
    return results


def run_cp_ranks(case_index: int, layout: AttentionLayout, fn: Callable, args, device, dtype,
                 backward: bool = True) -> list[Result]:
    """Flex fwd+bwd of each simulated CP rank's local queries (the training's split) against all keys.

    The per-rank attention time under context parallelism: its max / mean is
    the imbalance the CP split leaves (issue 21's figure), measured on one GPU.
    """
    from llada_cpt.parallel.cp_batch import split_layout

    scale = 1.0 / math.sqrt(args.head_dim)
    q, k, v, dout = _inputs(layout, args, device, dtype)
    results = []
    for rank in range(args.cp_size):
        name = f"flex cp{args.cp_size} rank {rank}"
        res = Result(case_index, name, "fwd+bwd" if backward else "fwd", "ok")
        try:
            local = split_layout(layout, args.cp_size, rank)
            rows = local.global_index(True).to(device)
            q_local = q.detach()[:, :, rows].requires_grad_(True)
            step = lambda: _step(fn, q_local, k, v, dout[:, :, rows], local, scale, backward)  # noqa: E731
            _clear_mask_caches()
            res.peak_mib = _peak_mib(step, device)
            for _ in range(args.warmup):
                step()
            res.ms = _time(step, device, args.iters)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            res.status = _error_status(exc)
        finally:
            _clear_mask_caches()
        results.append(res)
        print(f"  {name}: {res.status} " + (f"{res.ms:.2f} ms" if res.ms is not None else ""), flush=True)
    times = [r.ms for r in results if r.ms is not None]
    if len(times) == args.cp_size:
        imbalance = max(times) / (sum(times) / len(times))
        print(f"  cp{args.cp_size} per-rank flex {results[0].mode}: max / mean = {imbalance:.3f}")
    return results


class _Phases:
    """``with phase("what"):`` prints ``what`` when it starts and its seconds when it ends (flushed)."""

    def __init__(self, backend: str):
        self.backend = backend

    @contextlib.contextmanager
    def __call__(self, what: str):
        print(f"    {self.backend}: {what} ...", end="", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            print(f" {time.perf_counter() - start:.1f} s", flush=True)


def _build_mask(name: str, layout: AttentionLayout, q: torch.Tensor) -> None:
    if name.split("[")[0] == "flex":
        from llada_cpt.kernels.flex import FlexOptions, block_mask_for

        with _environ(_variant_env(name)):
            options = FlexOptions.from_env()
        block_mask_for(layout, q.device, options.tile, options.block_mask)
    elif name in ("cudnn", "te"):
        kbias.bias_for(layout, q.dtype, q.device)
    elif name == "te-unfused":
        kbias.masked_out_for(layout, q.device)
    else:  # unfused / reference build the dense boolean mask
        layout.dense_mask(local_queries=True).to(q.device)


def check_targets(cases: list[Case], results: list[Result], args) -> list[dict]:
    """PASS/FAIL per target and case (``n/a`` when a number is missing)."""
    verdicts = []
    largest = max(c.seq_length for c in cases)
    by_case: dict[int, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.backend] = r
    for i, case in enumerate(cases):
        rows = by_case.get(i, {})
        label = f"L={case.seq_length} B={case.block} docs={case.docs}"
        if case.seq_length == largest:
            unfused = rows.get("unfused")
            lower_bound = args.batch * args.heads * case.sq * case.sk * 2 / 2**20  # bf16 scores alone
            if unfused is not None and unfused.peak_mib is not None:
                ref_mib, ref_note = unfused.peak_mib, "unfused"
            elif unfused is not None and unfused.status == "OOM":
                ref_mib, ref_note = lower_bound, "unfused OOM: vs its score-matrix lower bound"
            else:
                ref_mib, ref_note = None, "no unfused number"
            for name in MEMORY_CHECKED:
                r = rows.get(name)
                if r is None or r.peak_mib is None or ref_mib is None:
                    verdict, detail = "n/a", (r.status if r is not None and r.status != "ok" else ref_note)
                else:
                    ratio = r.peak_mib / ref_mib
                    verdict = "PASS" if ratio <= MEMORY_TARGET else "FAIL"
                    detail = f"{r.peak_mib:.0f} / {ref_mib:.0f} MiB = {ratio:.1%} ({ref_note})"
                verdicts.append(dict(target=f"memory {name} <= {MEMORY_TARGET:.0%} of unfused", case=label,
                                     verdict=verdict, detail=detail))
        fused = [rows[n] for n in ("flex", "cudnn", "te")
                 if n in rows and rows[n].ms is not None and rows[n].mode == "fwd+bwd"]
        if not fused or case.dense_ms is None:
            verdicts.append(dict(target=f"speed best fused <= {SPEED_TARGET}x dense x tile fraction", case=label,
                                 verdict="n/a", detail="no fused fwd+bwd timing on this device"))
            continue
        best = min(fused, key=lambda r: r.ms)
        budget = SPEED_TARGET * case.dense_ms * case.tile_fraction
        verdicts.append(dict(
            target=f"speed best fused <= {SPEED_TARGET}x dense x tile fraction", case=label,
            verdict="PASS" if best.ms <= budget else "FAIL",
            detail=f"{best.backend} {best.ms:.2f} ms vs {SPEED_TARGET} x {case.dense_ms:.2f} "
                   f"x {case.tile_fraction:.3f} = {budget:.2f} ms",
        ))
    return verdicts


def suggested_auto_order(results: list[Result]) -> str:
    """Fused backends by total fwd+bwd time over the cases all of them ran (for LLADA_ATTENTION_AUTO_ORDER)."""
    times: dict[str, dict[int, float]] = {}
    for r in results:
        if r.backend in registry.FUSED and r.mode == "fwd+bwd" and r.ms is not None:
            times.setdefault(r.backend, {})[r.case] = r.ms
    common = set.intersection(*(set(t) for t in times.values())) if times else set()
    ranked = sorted(times, key=lambda n: sum(times[n][c] for c in common)) if common else []
    return ",".join(ranked + ["reference"])


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(env: dict, args, cases: list[Case], results: list[Result], verdicts: list[dict]) -> str:
    lines = [
        "# Block-diffusion attention backends" + (" (smoke run, not a measurement)" if args.smoke else ""),
        "",
        f"{env['date']} on {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
        f"triton {env['triton']}, TE {env['transformer-engine']}.",
        f"batch {args.batch}, heads {args.heads} (kv {args.kv_heads}), head dim {args.head_dim}, {args.dtype}; "
        f"{args.iters} timed iterations after {args.warmup} warm-up. `B=L` is MDLM (x_t alone, length L); "
        "other rows use the 2L layout. Peak memory: one cold fwd+bwd (mask structures included) above the "
        "inputs. Dense: SDPA without a mask on the same shape. Tiles: non-empty fraction of "
        f"{args.tile}x{args.tile} tiles.",
        "",
        "| L | B | docs | Sq x Sk | tiles | dense ms | backend | mode | fwd+bwd ms | x dense | peak MiB "
        "| mask build ms | new layout ms | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = {}
    for r in results:
        c = cases[r.case]
        status = status_cell(r.backend, r.status, notes)
        ratio = r.ms / c.dense_ms if (r.ms is not None and c.dense_ms) else None
        lines.append(
            f"| {c.seq_length} | {c.block} | {c.docs} | {c.sq}x{c.sk} | {c.tile_fraction:.3f} "
            f"| {_fmt(c.dense_ms, '.2f')} "
            f"| {r.backend} | {r.mode} | {_fmt(r.ms, '.2f')} | {_fmt(ratio, '.2f')} | {_fmt(r.peak_mib, '.0f')} "
            f"| {_fmt(r.mask_build_ms, '.1f')} | {_fmt(r.new_layout_ms, '.1f')} | {status} |"
        )
    lines += unavailable_notes(notes)
    lines += ["", f"Fastest first (for `auto`): `LLADA_ATTENTION_AUTO_ORDER={suggested_auto_order(results)}`"]
    lines += ["", "## Targets", "", "| target | case | verdict | detail |", "|---|---|---|---|"]
    lines += [f"| {v['target']} | {v['case']} | {v['verdict']} | {v['detail']} |" for v in verdicts]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized run that checks the script works")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=None)
    p.add_argument("--block-sizes", nargs="+", default=None, help="integers and/or L (MDLM)")
    p.add_argument("--docs", nargs="+", default=["one", "packed"], choices=["one", "packed"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--backends", nargs="+", default=None, help="subset of unfused reference flex cudnn te te-unfused")
    p.add_argument("--tile", type=int, default=None, help="tile edge for the non-empty fraction (128 on GPU)")
    p.add_argument("--flex-variants", nargs="+", default=[], metavar="VARIANT",
                   help="extra flex rows: a tile (128x64) and/or " + ", ".join(FLEX_VARIANTS) + " (join with +)")
    p.add_argument("--cp-size", type=int, default=0,
                   help="also time flex fwd+bwd per simulated context-parallel rank (its local queries)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    gpu = dict(seq_lengths=[4096, 8192], block_sizes=["32", "64", "L"], heads=16, kv_heads=8, head_dim=128,
               dtype="bf16", warmup=3, iters=10, tile=128)
    smoke = dict(seq_lengths=[64], block_sizes=["8", "L"], heads=2, kv_heads=1, head_dim=16,
                 dtype="fp32", warmup=1, iters=2, tile=16)
    for key, value in (smoke if args.smoke else gpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for b in args.block_sizes:
        if b != "L" and not (b.isdigit() and int(b) > 0):
            p.error(f"--block-sizes: `{b}` is neither a positive integer nor L")
        if b != "L" and any(n % int(b) for n in args.seq_lengths):
            p.error(f"--block-sizes: {b} does not divide every sequence length {args.seq_lengths}")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    for variant in args.flex_variants:
        try:
            flex_variant_env(variant)
        except ValueError as exc:
            p.error(str(exc))
    if args.cp_size and (args.cp_size < 2 or any(n % (2 * args.cp_size) for n in args.seq_lengths)):
        p.error(f"--cp-size {args.cp_size}: needs >= 2 ranks and 2 x cp to divide every sequence length")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: the benchmark needs a GPU; use --smoke on CPU to check the script", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    backends = _backends(device, args.flex_variants)
    if args.backends:
        args.backends = list(args.backends) + [f"flex[{v}]" for v in args.flex_variants]
        unknown = set(args.backends) - set(backends) - {"te-unfused"}
        if unknown:
            print(f"unknown --backends {sorted(unknown)}; choose from {sorted(backends)}", file=sys.stderr)
            return 2
        backends = {k: v for k, v in backends.items() if k in args.backends}
    env = environment(device, packages=KERNEL_PACKAGES)
    print(f"attention benchmark on {env['device']} (torch {env['torch']})", flush=True)
    cases: list[Case] = []
    results: list[Result] = []
    for seq_length in args.seq_lengths:
        for block in args.block_sizes:
            for docs in args.docs:
                layout = make_layout(seq_length, block, docs, args.batch, seed=seq_length, device=device)
                sq, sk = layout.global_index(True).numel(), layout.global_index(False).numel()
                fraction, _ = tile_occupancy(layout, args.tile, device=device)
                case = Case(seq_length, block, docs, sq, sk, fraction)
                cases.append(case)
                print(f"L={seq_length} B={block} docs={docs}: {sq}x{sk}, non-empty tiles {fraction:.3f}", flush=True)
                results += run_case(len(cases) - 1, case, layout, backends, args, device, dtype)
                flex_fn, flex_reason = backends.get("flex", (None, "not selected"))
                flex_runs = flex_reason is None or _forward_only_ok("flex", flex_reason, device)
                if args.cp_size and flex_fn is not None and flex_runs:
                    results += run_cp_ranks(len(cases) - 1, layout, flex_fn, args, device, dtype, flex_reason is None)
                _write(args, env, cases, results, partial=True)  # a time limit still leaves what was measured
    verdicts = _write(args, env, cases, results, partial=False)
    for v in verdicts:
        print(f"{v['verdict']:4s}  {v['target']}  [{v['case']}]  {v['detail']}")
    print(f"fastest first: LLADA_ATTENTION_AUTO_ORDER={suggested_auto_order(results)}")
    stem = "attention_smoke" if args.smoke else "attention"
    print(f"wrote {Path(args.out) / (stem + '.md')} and .json")
    return 0


def _write(args, env: dict, cases: list[Case], results: list[Result], partial: bool) -> list[dict]:
    """Write the result files (``partial``: after a case, marked as such); returns the target verdicts."""
    verdicts = check_targets(cases, results, args)
    stem = "attention_smoke" if args.smoke else "attention"
    out = Path(args.out)
    payload = dict(environment=env, settings={k: v for k, v in vars(args).items()}, partial=partial,
                   cases=[dataclasses.asdict(c) for c in cases], results=[dataclasses.asdict(r) for r in results],
                   targets=verdicts, auto_order=suggested_auto_order(results))
    write_atomic(out / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    text = markdown(env, args, cases, results, verdicts)
    if partial:
        text = text.replace("\n", f"\n\n**Partial: written after case {len(cases)}; the run did not finish.**\n", 1)
    write_atomic(out / f"{stem}.md", text)
    return verdicts


if __name__ == "__main__":
    sys.exit(main())

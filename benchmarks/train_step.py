"""Training-step throughput with each attention backend: tokens/s and MFU of a ~1B dense model.

One rank, Megatron-Core ``GPTModel`` from ``llada_cpt.model.provider``, the real
step (``llada_cpt.training.step.forward_backward`` + optimizer step), BDLM block
32 and MDLM at L = 4096 by default, on packed documents.  FLOPs are counted
honestly (``llada_cpt.training.flops.step_flops``): linear layers over every
input token (2L for BDLM, L for MDLM; the LM head over the x_t half), attention over the allowed (query, key)
pairs only; MFU divides by the device's dense bf16 peak.  Every step gets new
micro-batches (new layouts), so mask building and any recompilation are paid
as in training.  The backend is switched in place on the same model and
optimizer, so all backends train identical weights' shapes.

    python benchmarks/train_step.py                       # GPU: qwen3-1.7b trimmed to 16 layers (~1.1B)
    python benchmarks/train_step.py --set model.num_layers=28 --seq-length 8192
    python benchmarks/train_step.py --smoke               # CPU: tiny preset, checks the script runs

Writes ``benchmarks/results/train_step.md`` and ``.json`` (``train_step_smoke.*``
with ``--smoke``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llada_cpt.benchmarking import environment, status_cell, unavailable_notes, write_atomic  # noqa: E402
from llada_cpt.config.loader import load_config  # noqa: E402
from llada_cpt.diffusion.inputs import build_diffusion_batch  # noqa: E402
from llada_cpt.parallel.work import random_document_ids  # noqa: E402

from llada_cpt.kernels import registry  # noqa: E402


@dataclasses.dataclass
class Row:
    backend: str
    block: str
    status: str
    step_s: Optional[float] = None
    tokens_per_s: Optional[float] = None  # data tokens (L per sequence)
    input_tokens_per_s: Optional[float] = None  # model input tokens (2L for BDLM)
    tflops_per_s: Optional[float] = None
    mfu: Optional[float] = None
    peak_gib: Optional[float] = None
    loss: Optional[float] = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script works")
    p.add_argument("--preset", default=None, help="model preset (default qwen3-1.7b; tiny with --smoke)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.num_layers=16 (repeatable)")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--block-sizes", nargs="+", default=None, help="integers and/or L (MDLM)")
    p.add_argument("--backends", nargs="+", default=["reference", "flex", "cudnn", "te"])
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step (grad accumulation)")
    p.add_argument("--docs", default="packed", choices=["packed", "one"])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=None, help="device dense bf16 peak (default: known GPUs)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    gpu = dict(preset="qwen3-1.7b", seq_length=4096, block_sizes=["32", "L"], warmup=2, steps=5)
    smoke = dict(preset="tiny", seq_length=64, block_sizes=["8", "L"], warmup=1, steps=2)
    defaults = smoke if args.smoke else gpu
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not any(o.startswith("model.num_layers=") for o in args.overrides) and not args.smoke:
        args.overrides = ["model.num_layers=16"] + args.overrides  # ~1.1B parameters
    if args.smoke and not any(o.startswith("model.vocab_size=") for o in args.overrides):
        args.overrides = ["model.vocab_size=512"] + args.overrides
    for b in args.block_sizes:
        if b != "L" and not (b.isdigit() and int(b) > 0 and args.seq_length % int(b) == 0):
            p.error(f"--block-sizes: `{b}` must be L or a positive divisor of --seq-length {args.seq_length}")
    unknown = [b for b in args.backends if b not in registry.NAMES]
    if unknown:
        p.error(f"--backends: unknown {unknown}; choose from {', '.join(registry.NAMES)}")
    return args


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _batches(args, block: str, vocab: int, mask_id: int, seed: int):
    """``micro_batches`` fresh diffusion batches (new documents, tokens and noise)."""
    g = torch.Generator().manual_seed(seed)
    L = args.seq_length
    size = L if block == "L" else int(block)
    out = []
    for _ in range(args.micro_batches):
        rows = args.micro_batch_size
        if args.docs == "one":
            doc = torch.zeros(rows, L, dtype=torch.long)
        else:
            doc = torch.stack([random_document_ids(L, g, min_len=min(16, L // 2), max_len=max(16, min(3000, L // 2)))
                               for _ in range(rows)])
        x0 = torch.randint(0, mask_id, (rows, L), generator=g)
        out.append(build_diffusion_batch(x0, doc, size, mask_id, generator=g))
    return out


def _set_backend(chunks, name: str) -> int:
    """Point every block-diffusion core attention of the model at backend ``name``; returns how many."""
    from llada_cpt.attention.core import BlockDiffusionAttention

    fn = registry.resolve(name)
    count = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, BlockDiffusionAttention):
                module.backend = fn
                count += 1
    if not count:
        raise RuntimeError("no BlockDiffusionAttention module found in the model; is the layer spec ours?")
    return count


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run(args) -> tuple[dict, list[Row]]:
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\..*")  # "TE/apex not installed" chatter
    from llada_cpt.model.provider import build_model, resolve_dtype
    from llada_cpt.training.distributed import destroy, initialize, wrap_ddp
    from llada_cpt.training.flops import device_peak_flops, step_flops
    from llada_cpt.training.optimizer import build_optimizer
    from llada_cpt.training.step import forward_backward

    overrides = [f"model.preset={args.preset}", "model.attention_backend=reference",
                 f"data.seq_length={args.seq_length}", f"train.micro_batch_size={args.micro_batch_size}",
                 f"train.global_batch_size={args.micro_batch_size * args.micro_batches}",
                 f"train.train_steps={args.warmup + args.steps}", "train.lr_warmup_steps=0"] + args.overrides
    cfg = load_config(None, overrides)
    vocab = cfg.model.vocab_size
    if not vocab:
        raise SystemExit("the model has no vocab_size; pass --set model.vocab_size=N")
    mask_id = vocab - 1
    initialize(cfg.parallel, seed=cfg.train.seed)
    dtype = resolve_dtype(cfg.train.precision)
    chunks = build_model(cfg.model, cfg.parallel, cfg.train.precision, vocab_size=vocab)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    chunks = wrap_ddp(chunks, cfg.parallel)
    optimizer = build_optimizer(cfg, chunks, dtype == torch.bfloat16)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops()
    meta = dict(params=params, vocab=vocab, dtype=str(dtype), model=dataclasses.asdict(cfg.model), peak_flops=peak)
    print(f"model: {params / 1e9:.3f}B parameters, {cfg.model.num_layers} layers, {dtype}", flush=True)
    rows: list[Row] = []
    for name in args.backends:
        reason = registry.unavailable_reason(name) if name != "auto" else None
        if reason is not None:
            for block in args.block_sizes:
                rows.append(Row(name, block, f"unavailable: {reason}"))
            print(f"{name}: unavailable: {reason}", flush=True)
            continue
        _set_backend(chunks, name)
        for block in args.block_sizes:
            row = Row(name, block, "ok")
            try:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                times, flops, losses = [], [], []
                for i in range(args.warmup + args.steps):
                    batches = _batches(args, block, vocab, mask_id, seed=1000 * i + len(rows))
                    _sync()
                    t0 = time.perf_counter()
                    result = forward_backward(chunks, batches)
                    optimizer.step()
                    _sync()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
                        flops.append(step_flops(cfg.model, vocab, [b.layout for b in batches]))
                        losses.append(result.loss)
                step_s = sum(times) / len(times)
                tokens = args.micro_batches * args.micro_batch_size * args.seq_length
                copies = 1 if block == "L" else 2
                row.step_s = step_s
                row.tokens_per_s = tokens / step_s
                row.input_tokens_per_s = copies * tokens / step_s
                row.tflops_per_s = sum(flops) / sum(times) / 1e12
                row.mfu = (sum(flops) / sum(times) / peak) if peak else None
                row.loss = sum(losses) / len(losses)
                if torch.cuda.is_available():
                    row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
            except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others
                row.status = "OOM" if _oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                for chunk in chunks:
                    chunk.zero_grad_buffer()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            rows.append(row)
            print(f"{name:9s} B={block:4s} {row.status:3s} "
                  + (f"{row.step_s * 1e3:9.1f} ms/step {row.tokens_per_s:10.0f} tok/s" if row.step_s else "")
                  + (f"  MFU {row.mfu:.1%}" if row.mfu is not None else ""), flush=True)
    destroy()
    return meta, rows


def markdown(env: dict, args, meta: dict, rows: list[Row]) -> str:
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    notes = {}
    lines = [
        "# Training step throughput by attention backend" + (" (smoke run, not a measurement)" if args.smoke else ""),
        "",
        f"{env['date']} on {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}.",
        f"Model: preset {args.preset} with {' '.join(args.overrides) or 'no overrides'} "
        f"({meta['params'] / 1e9:.3f}B parameters, {meta['dtype']}); L = {args.seq_length}, "
        f"{args.micro_batches} x {args.micro_batch_size} sequences per step, {args.docs} documents; "
        f"mean of {args.steps} steps after {args.warmup} warm-up, each with new micro-batches. "
        "tokens/s counts L per sequence (input tokens: 2L for BDLM); FLOPs: linear layers over all input "
        "tokens (LM head: x_t half), attention over allowed pairs only (`step_flops`); MFU against "
        f"{f(meta['peak_flops'] and meta['peak_flops'] / 1e12, '.0f')} TFLOP/s.",
        "",
        "| backend | B | ms/step | tokens/s | input tokens/s | TFLOP/s | MFU | peak GiB | loss | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = status_cell(r.backend, r.status, notes)
        lines.append(
            f"| {r.backend} | {r.block} | {f(r.step_s and r.step_s * 1e3, '.1f')} | {f(r.tokens_per_s, '.0f')} "
            f"| {f(r.input_tokens_per_s, '.0f')} | {f(r.tflops_per_s, '.1f')} | {f(r.mfu, '.1%')} "
            f"| {f(r.peak_gib, '.1f')} | {f(r.loss, '.3f')} | {status} |"
        )
    lines += unavailable_notes(notes)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device: this benchmark needs a GPU; use --smoke on CPU to check the script", file=sys.stderr)
        return 2
    env = environment()
    meta, rows = run(args)
    stem = "train_step_smoke" if args.smoke else "train_step"
    out = Path(args.out)
    payload = dict(environment=env, settings=vars(args), model=meta, rows=[dataclasses.asdict(r) for r in rows])
    write_atomic(out / f"{stem}.json", json.dumps(payload, indent=2, default=str) + "\n")
    write_atomic(out / f"{stem}.md", markdown(env, args, meta, rows))
    print(f"wrote {out / (stem + '.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    python benchmarks/train_step.py --backends flex --micro-batches 1 8 --head megatron chunked \
        --optimizer megatron fast --profile               # where the time goes, each change toggled

``--micro-batches 1 8``: rows at 1 and 8 micro-batches per step (what real training sees).
``--head`` (``model.fused_cross_entropy``: megatron = logits + Megatron's cross entropy,
chunked = ``kernels/linear_cross_entropy.py``) and ``--optimizer`` (megatron = Megatron's
fallback without apex/TE, fast = fused AdamW + ``_foreach`` grad norm / clipping,
``megatron_patches/torch_optimizer.py``) toggle the changes on the same model and optimizer.
``--profile`` runs one more step of every row under ``torch.profiler`` and splits the
device time (CPU time on CPU) into categories -- GEMM, attention, norm, cross-entropy,
optimizer, communication/sync, elementwise, other -- for forward+backward and for the
optimizer step, plus the wall time of each phase (wall - busy = host-bound idle time).

Writes ``benchmarks/results/train_step.md`` and ``.json`` (``train_step_smoke.*``
with ``--smoke``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llada_cpt.benchmarking import environment, status_cell, unavailable_notes, write_atomic  # noqa: E402
from llada_cpt.config.loader import load_config  # noqa: E402
from llada_cpt.diffusion.inputs import build_diffusion_batch  # noqa: E402
from llada_cpt.kernels import registry  # noqa: E402
from llada_cpt.parallel.work import random_document_ids  # noqa: E402


@dataclasses.dataclass
class Row:
    backend: str
    block: str
    status: str
    micro_batches: int = 1
    head: str = "auto"
    optimizer: str = "auto"
    step_s: Optional[float] = None
    tokens_per_s: Optional[float] = None  # data tokens (L per sequence)
    input_tokens_per_s: Optional[float] = None  # model input tokens (2L for BDLM)
    tflops_per_s: Optional[float] = None
    mfu: Optional[float] = None
    peak_gib: Optional[float] = None
    loss: Optional[float] = None
    profile: Optional[dict] = None  # --profile: {"fwd_bwd": {category: ms}, "optimizer": {...}, "wall_ms": {...}}


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
    p.add_argument("--micro-batches", type=int, nargs="+", default=None,
                   help="micro-batches per step (grad accumulation), one row each (default 1 8; 1 with --smoke)")
    p.add_argument("--head", nargs="+", default=["auto"], choices=["auto", "chunked", "megatron"],
                   help="LM head + cross entropy (model.fused_cross_entropy), one row each")
    p.add_argument("--optimizer", nargs="+", default=["auto"], choices=["auto", "fast", "megatron"],
                   help="optimizer path without apex/TE: fast (fused AdamW, _foreach norm/clip) or megatron's")
    p.add_argument("--profile", action="store_true",
                   help="one extra step per row under torch.profiler: time per category and phase")
    p.add_argument("--docs", default="packed", choices=["packed", "one"])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=None, help="device dense bf16 peak (default: known GPUs)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    gpu = dict(preset="qwen3-1.7b", seq_length=4096, block_sizes=["32", "L"], warmup=2, steps=5, micro_batches=[1, 8])
    smoke = dict(preset="tiny", seq_length=64, block_sizes=["8", "L"], warmup=1, steps=2, micro_batches=[1])
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
    if any(m < 1 for m in args.micro_batches):
        p.error(f"--micro-batches: every value must be >= 1, got {args.micro_batches}")
    unknown = [b for b in args.backends if b not in registry.NAMES]
    if unknown:
        p.error(f"--backends: unknown {unknown}; choose from {', '.join(registry.NAMES)}")
    return args


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _batches(args, block: str, vocab: int, mask_id: int, seed: int, micro_batches: int):
    """``micro_batches`` fresh diffusion batches (new documents, tokens and noise)."""
    g = torch.Generator().manual_seed(seed)
    L = args.seq_length
    size = L if block == "L" else int(block)
    out = []
    for _ in range(micro_batches):
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


def _set_head(chunks, head: str) -> None:
    """``model.fused_cross_entropy`` on every chunk (``auto``: what the provider chose)."""
    from llada_cpt.kernels.linear_cross_entropy import use_fused_cross_entropy
    from llada_cpt.model.wrappers import unwrap

    for chunk in chunks:
        model = unwrap(chunk)
        if not hasattr(model, "_auto_fused_cross_entropy"):
            model._auto_fused_cross_entropy = model.fused_cross_entropy
        model.fused_cross_entropy = model._auto_fused_cross_entropy if head == "auto" else \
            use_fused_cross_entropy(head, False, torch.cuda.is_available())


def _set_optimizer(optimizer, path: str) -> None:
    """fast: fused AdamW + ``_foreach`` norm/clip; megatron: Megatron's fallback without apex/TE; auto: our default."""
    from llada_cpt.megatron_patches import torch_optimizer

    if path == "megatron":
        torch_optimizer.revert()
    else:
        torch_optimizer.apply()
    torch_optimizer.use_fused_adamw(optimizer, path == "fast" or (path == "auto" and torch.cuda.is_available()))


def _measure(args, row: Row, chunks, optimizer, cfg, vocab: int, mask_id: int, peak, seed: int) -> None:
    """Warm-up and timed steps of one row (fills ``row``); then one profiled step with ``--profile``."""
    from llada_cpt.training.flops import step_flops
    from llada_cpt.training.step import forward_backward

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, flops, losses = [], [], []
    for i in range(args.warmup + args.steps):
        batches = _batches(args, row.block, vocab, mask_id, seed=1000 * i + seed, micro_batches=row.micro_batches)
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
    tokens = row.micro_batches * args.micro_batch_size * args.seq_length
    copies = 1 if row.block == "L" else 2
    row.step_s = step_s
    row.tokens_per_s = tokens / step_s
    row.input_tokens_per_s = copies * tokens / step_s
    row.tflops_per_s = sum(flops) / sum(times) / 1e12
    row.mfu = (sum(flops) / sum(times) / peak) if peak else None
    row.loss = sum(losses) / len(losses)
    if torch.cuda.is_available():
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        batches = _batches(args, row.block, vocab, mask_id, seed=999_999 + seed, micro_batches=row.micro_batches)
        row.profile = profiled_step(chunks, optimizer, batches)


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------- profile

CATEGORIES = ("GEMM", "attention", "norm", "cross-entropy", "optimizer", "communication/sync", "elementwise", "other")
PHASES = ("fwd_bwd", "optimizer")
# first match wins; matched against the kernel (or CPU op) name and the names of its scopes: the op's
# ancestors, the record_function ranges below and, in backward, the scopes of the forward op it differentiates
_RULES = [
    ("communication/sync", r"nccl|gloo:|c10d::|all_?reduce|all_?gather|reduce_?scatter|memcpy"
                           r"|aten::_local_scalar_dense|aten::item\b"),
    # triton_tem: inductor template kernels, i.e. compiled flex attention (the only template in the step)
    ("attention", r"llada::attention|flash|fmha|flex_?attention|sdpa|scaled_dot_product|triton_tem"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|cublas|aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_mm)\b"),
    ("cross-entropy", r"llada::cross_entropy|cross_?entropy|log_softmax|nll_loss"),
    ("norm", r"llada::norm|rms_?norm|layer_?norm"),
    ("optimizer", r"llada::optimizer|adam|multi_tensor|_foreach"),
]
_COMPILED = [(name, re.compile(rx, re.IGNORECASE)) for name, rx in _RULES]
_SCOPE_ONLY = ("llada::fwd_bwd", "llada::optimizer", "ProfilerStep")


def categorize(name: str, scopes: Iterable[str]) -> str:
    """The category of one kernel / op from its name and the names of the scopes it ran in."""
    texts = [name, *scopes]
    for category, rx in _COMPILED:
        if any(rx.search(t) for t in texts):
            return category
    return "elementwise" if name.startswith("aten::") or "elementwise" in name or "triton" in name else "other"


def split_profile(events, device: str) -> dict:
    """Time per (phase, category) in ms from ``prof.events()`` of one step (see :func:`profiled_step`).

    CUDA: the device time of every kernel, attributed through the CPU op that launched it;
    CPU: the self time of every op.  Phase = launched before or after the optimizer range
    started (the step synchronises in between).  Backward ops inherit the scopes of the
    forward op with the same ``sequence_nr``, so e.g. attention backward counts as attention.
    """
    cpu_events = [e for e in events if e.device_type.name == "CPU"]
    boundary = min((e.time_range.start for e in cpu_events if e.name == "llada::optimizer"), default=float("inf"))
    forward_scopes: Dict[int, set] = {}
    ancestors = {id(e): _ancestor_events(e) for e in cpu_events}
    for e in cpu_events:
        anc = [a.name for a in ancestors[id(e)]]
        if e.sequence_nr >= 0 and not any(a.startswith("autograd::engine") for a in anc):
            forward_scopes.setdefault(e.sequence_nr, set()).update([e.name, *anc])
    out = {phase: dict.fromkeys(CATEGORIES, 0.0) for phase in PHASES}
    walls = {phase: 0.0 for phase in PHASES}
    for e in cpu_events:
        if e.name in ("llada::fwd_bwd", "llada::optimizer"):
            walls["optimizer" if e.name == "llada::optimizer" else "fwd_bwd"] += e.time_range.elapsed_us() / 1e3
        scopes = {a.name for a in ancestors[id(e)]}
        for a in [e] + ancestors[id(e)]:
            if a.name.startswith("autograd::engine::evaluate_function") and a.sequence_nr >= 0:
                scopes.update(forward_scopes.get(a.sequence_nr, ()))
        phase = "optimizer" if e.time_range.start >= boundary else "fwd_bwd"
        if device == "cuda":
            for k in e.kernels:
                out[phase][categorize(k.name, [e.name, *scopes])] += k.duration / 1e3
        elif e.name not in _SCOPE_ONLY and not e.name.startswith("ProfilerStep"):
            out[phase][categorize(e.name, scopes)] += e.self_cpu_time_total / 1e3
    return {**out, "wall_ms": walls, "device": device}


def _ancestor_events(evt) -> list:
    out, parent = [], evt.cpu_parent
    while parent is not None:
        out.append(parent)
        parent = parent.cpu_parent
    return out


@contextlib.contextmanager
def _scopes(chunks):
    """record_function ranges around core attention, norms and Megatron's cross entropy (forward)."""
    from llada_cpt.attention.core import BlockDiffusionAttention
    from llada_cpt.model.wrappers import unwrap

    handles, stack = [], []

    def enter(name):
        def pre(_module, _args):
            rf = torch.profiler.record_function(name)
            rf.__enter__()
            stack.append(rf)
        return pre

    def leave(_module, _args, _out):
        stack.pop().__exit__(None, None, None)

    models = [unwrap(c) for c in chunks]
    for model in models:
        for module in model.modules():
            name = type(module).__name__
            scope = "llada::attention" if isinstance(module, BlockDiffusionAttention) else \
                "llada::norm" if name.endswith("Norm") else None
            if scope:
                handles += [module.register_forward_pre_hook(enter(scope)), module.register_forward_hook(leave)]
        loss = model.compute_language_model_loss

        def scoped(labels, logits, _loss=loss):
            with torch.profiler.record_function("llada::cross_entropy"):
                return _loss(labels, logits)

        model.compute_language_model_loss = scoped
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for model in models:
            del model.compute_language_model_loss


def profiled_step(chunks, optimizer, batches) -> dict:
    """One training step under ``torch.profiler``: :func:`split_profile` of it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from llada_cpt.training.step import forward_backward

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync()
    with _scopes(chunks), profile(activities=activities) as prof:
        with record_function("llada::fwd_bwd"):
            forward_backward(chunks, batches)
            _sync()
        with record_function("llada::optimizer"):
            optimizer.step()
            _sync()
    return split_profile(prof.events(), "cuda" if cuda else "cpu")



def run(args) -> tuple[dict, list[Row]]:
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\..*")  # "TE/apex not installed" chatter
    from llada_cpt.model.provider import build_model, resolve_dtype
    from llada_cpt.training.distributed import destroy, initialize, wrap_ddp
    from llada_cpt.training.flops import device_peak_flops
    from llada_cpt.training.optimizer import build_optimizer

    overrides = [f"model.preset={args.preset}", "model.attention_backend=reference",
                 f"data.seq_length={args.seq_length}", f"train.micro_batch_size={args.micro_batch_size}",
                 f"train.global_batch_size={args.micro_batch_size * max(args.micro_batches)}",
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
    variants = [(mb, head, opt) for mb in args.micro_batches for head in args.head for opt in args.optimizer]
    for name in args.backends:
        reason = registry.unavailable_reason(name) if name != "auto" else None
        if reason is not None:
            for mb, head, opt in variants:
                for block in args.block_sizes:
                    rows.append(Row(name, block, f"unavailable: {reason}", mb, head, opt))
            print(f"{name}: unavailable: {reason}", flush=True)
            continue
        _set_backend(chunks, name)
        for mb, head, opt in variants:
            _set_head(chunks, head)
            _set_optimizer(optimizer, opt)
            for block in args.block_sizes:
                row = Row(name, block, "ok", mb, head, opt)
                try:
                    _measure(args, row, chunks, optimizer, cfg, vocab, mask_id, peak, seed=len(rows))
                except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others
                    first = str(exc).splitlines()[0][:160] if str(exc) else ""
                    row.status = "OOM" if _oom(exc) else f"error: {type(exc).__name__}: {first}"
                    for chunk in chunks:
                        chunk.zero_grad_buffer()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                rows.append(row)
                print(f"{name:9s} B={block:4s} mb={mb} head={head} opt={opt} {row.status:3s} "
                      + (f"{row.step_s * 1e3:9.1f} ms/step {row.tokens_per_s:10.0f} tok/s" if row.step_s else "")
                      + (f"  MFU {row.mfu:.1%}" if row.mfu is not None else ""), flush=True)
    destroy()
    return meta, rows


def profile_table(row: Row) -> List[str]:
    """Markdown: time per category and phase of one profiled step (device time on GPU, CPU time on CPU)."""
    prof = row.profile
    unit = "GPU kernel time" if prof["device"] == "cuda" else "CPU self time (not a GPU figure)"
    total = sum(sum(prof[p].values()) for p in PHASES) or 1.0
    lines = [f"Profile: {row.backend}, B = {row.block}, {row.micro_batches} micro-batches, head {row.head}, "
             f"optimizer {row.optimizer} ({unit}, ms)", "",
             "| category | fwd+bwd | optimizer step | share |", "|---|---|---|---|"]
    for cat in CATEGORIES:
        a, b = prof["fwd_bwd"][cat], prof["optimizer"][cat]
        if a or b:
            lines.append(f"| {cat} | {a:.2f} | {b:.2f} | {(a + b) / total:.1%} |")
    busy = [sum(prof[p].values()) for p in PHASES]
    wall = [prof["wall_ms"][p] for p in PHASES]
    lines.append(f"| **busy** | {busy[0]:.2f} | {busy[1]:.2f} | |")
    lines.append(f"| wall | {wall[0]:.2f} | {wall[1]:.2f} | |")
    return lines


def markdown(env: dict, args, meta: dict, rows: list[Row]) -> str:
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    notes = {}
    lines = [
        "# Training step throughput by attention backend" + (" (smoke run, not a measurement)" if args.smoke else ""),
        "",
        f"{env['date']} on {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}.",
        f"Model: preset {args.preset} with {' '.join(args.overrides) or 'no overrides'} "
        f"({meta['params'] / 1e9:.3f}B parameters, {meta['dtype']}); L = {args.seq_length}, "
        f"{'/'.join(map(str, args.micro_batches))} micro-batches x {args.micro_batch_size} sequences per step, "
        f"{args.docs} documents; "
        f"mean of {args.steps} steps after {args.warmup} warm-up, each with new micro-batches. "
        "tokens/s counts L per sequence (input tokens: 2L for BDLM); FLOPs: linear layers over all input "
        "tokens (LM head: x_t half), attention over allowed pairs only (`step_flops`); MFU against "
        f"{f(meta['peak_flops'] and meta['peak_flops'] / 1e12, '.0f')} TFLOP/s.",
        "",
        "| backend | B | micro-batches | head | optimizer | ms/step | tokens/s | input tokens/s | TFLOP/s | MFU "
        "| peak GiB | loss | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = status_cell(r.backend, r.status, notes)
        lines.append(
            f"| {r.backend} | {r.block} | {r.micro_batches} | {r.head} | {r.optimizer} "
            f"| {f(r.step_s and r.step_s * 1e3, '.1f')} | {f(r.tokens_per_s, '.0f')} "
            f"| {f(r.input_tokens_per_s, '.0f')} | {f(r.tflops_per_s, '.1f')} | {f(r.mfu, '.1%')} "
            f"| {f(r.peak_gib, '.1f')} | {f(r.loss, '.3f')} | {status} |"
        )
    for r in rows:
        if r.profile:
            lines += ["", *profile_table(r)]
    if any(r.head == "chunked" or (r.head == "auto" and torch.cuda.is_available()) for r in rows):
        lines += ["", "The chunked head computes the LM head only at masked x_t positions; FLOPs still count it over "
                  "every x_t token (as the megatron head computes), so compare those rows by tokens/s."]
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

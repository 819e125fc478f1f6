"""Block-diffusion sampler: TPF and tokens/s vs threshold and block size, and the KV-cache speed-up.

    python benchmarks/generate.py [--ckpt RUN] [--thresholds 0.5 0.7 0.9 0.95] [--block-sizes 16 32 64]
                                  [--prompts 8] [--max-new-tokens 64] [--precision auto]

Without ``--ckpt`` it first trains the toy model of ``tests/toy_generation_model.py``
(the tiny demo recipe on a small memorisable corpus, seq_length 128, WSD ending at
block size 32; the stdlib demo model is too weak after a CPU-sized run for thresholds
to matter: its confidence stays ~0.1).  For each block size it also decodes one token
per step (threshold > 1, the sequential greedy reference) and reports, per threshold,
the share of tokens equal to it (``agree``: what faster decoding costs).  The cache
rows time the same greedy decoding with and without the KV cache (recomputing the
whole prefix every step), for the benchmark prompts and for prompts padded to ~``--long-prompt``
tokens, where recomputation costs grow with the prefix.

Writes ``benchmarks/results/generate.md`` and ``.json`` (device, versions, date).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the toy-model recipe shared with the CLI tests

from llada_cpt.benchmarking import environment, generated_by, write_atomic  # noqa: E402


def _prompts(tokenizer, n: int) -> list[list[int]]:
    from toy_generation_model import PROMPTS, SNIPPETS

    texts = list(PROMPTS) + [s.split("\n")[0] for s in SNIPPETS]
    return [tokenizer.encode(texts[i % len(texts)]) for i in range(n)]


def _run(m, prompts, cfg, repeats: int = 1) -> tuple[list, object]:
    """Token ids and stats; with ``repeats`` the fastest of identical runs (shared CPUs are noisy)."""
    from llada_cpt.inference.generation import generate

    best = None
    for _ in range(repeats):
        out = generate(m, prompts, cfg)
        if best is None or out.stats.seconds < best.stats.seconds:
            best = out
    return [r.token_ids for r in best], best.stats


def _agreement(got: list, ref: list) -> float:
    same = total = 0
    for a, b in zip(got, ref):
        n = max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b))
        total += n
    return same / max(total, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--long-prompt", type=int, default=384, help="prompt length of the second cache comparison")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the fastest is reported")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generate"))
    args = p.parse_args(argv)

    from llada_cpt.inference.engine import load_model_for_inference
    from llada_cpt.inference.sampler import SamplerConfig

    work = None
    ckpt = args.ckpt
    if ckpt is None:
        from toy_generation_model import train_toy_model

        work = tempfile.mkdtemp(prefix="bench-generate-")
        t0 = time.perf_counter()
        ckpt = str(train_toy_model(Path(work), steps=args.train_steps, seq_length=128,
                                   block_schedule=((4, 30), (16, 60), (32, 1000)), timeout=3600))
        print(f"trained the toy model in {time.perf_counter() - t0:.0f} s", flush=True)
    m = load_model_for_inference(ckpt, precision=args.precision)
    tok = m.tokenizer
    prompts = _prompts(tok, args.prompts)
    base = dict(max_new_tokens=args.max_new_tokens, batch_size=args.prompts)
    _run(m, prompts, SamplerConfig(block_size=args.block_sizes[0], threshold=1.5, **base))  # warm-up

    sweep = []
    for B in args.block_sizes:
        ref, ref_stats = _run(m, prompts, SamplerConfig(block_size=B, threshold=1.5, **base), args.repeats)
        rows = [("seq", ref_stats, 1.0)]
        for thr in args.thresholds:
            ids, stats = _run(m, prompts, SamplerConfig(block_size=B, threshold=thr, **base), args.repeats)
            rows.append((thr, stats, _agreement(ids, ref)))
        for thr, st, agree in rows:
            sweep.append({"block_size": B, "threshold": thr, "tpf": st.tpf, "tokens_per_s": st.tokens_per_second,
                          "forward_passes": st.forward_passes, "tokens": st.generated_tokens, "seconds": st.seconds,
                          "agree_with_sequential": agree})
            print(f"B={B:3d} threshold={thr!s:>4} TPF {st.tpf:5.2f} | {st.tokens_per_second:8.1f} tok/s | "
                  f"forwards {st.forward_passes:4d} | agree {agree:.3f}", flush=True)

    cache_rows = []
    filler = tok.encode("\n".join(["x = 1"] * args.long_prompt))
    long_prompts = [(filler + pr)[-args.long_prompt:] for pr in prompts]
    for label, ps in (("benchmark prompts", prompts), (f"~{args.long_prompt}-token prompts", long_prompts)):
        for B in args.block_sizes:
            cfg = dict(block_size=B, threshold=0.95, **base)
            ids_c, st_c = _run(m, ps, SamplerConfig(use_cache=True, **cfg), args.repeats)
            ids_r, st_r = _run(m, ps, SamplerConfig(use_cache=False, **cfg), args.repeats)
            cache_rows.append({"prompts": label, "prompt_tokens": sum(map(len, ps)) // len(ps), "block_size": B,
                               "cached_s": st_c.seconds, "recompute_s": st_r.seconds,
                               "speedup": st_r.seconds / st_c.seconds, "same_tokens": ids_c == ids_r})
            print(f"{label}: B={B} cache {st_c.seconds:.2f} s, recompute {st_r.seconds:.2f} s "
                  f"-> x{st_r.seconds / st_c.seconds:.2f} (same tokens: {ids_c == ids_r})", flush=True)

    info = m.info
    meta = {
        **environment(None, packages=("megatron-core",)),
        "dtype": str(m.dtype).replace("torch.", ""),
        "checkpoint": "toy model (trained here)" if args.ckpt is None else str(info.path),
        "trained_block_size": info.trained_block_size, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
    }
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, "sweep": sweep, "cache": cache_rows}, indent=2))
    md = [
        "# Block-diffusion sampler: TPF, speed, KV cache",
        "",
        generated_by(meta, "benchmarks/generate.py", ("megatron-core",), meta["dtype"])
        + f" (times on a shared CPU are noisy: each is the fastest of {args.repeats} identical runs; "
        "TPF is not a time).",
        "",
        f"Model: {meta['checkpoint']}, trained block size {meta['trained_block_size']}. {args.prompts} prompts decoded "
        f"as one batch, {args.max_new_tokens} new tokens each, greedy. TPF = generated tokens / decoding steps per "
        "sequence; `seq` = one token per step (threshold > 1), the sequential reference; `agree` = share of "
        "tokens equal to it.",
        "",
        "| block | threshold | TPF | tokens/s | forward passes | agree |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    md += [f"| {r['block_size']} | {r['threshold']} | {r['tpf']:.2f} | {r['tokens_per_s']:.1f} | "
           f"{r['forward_passes']} | {r['agree_with_sequential']:.3f} |" for r in sweep]
    md += ["", "KV cache vs recomputing the whole prefix at every step (threshold 0.95, same tokens checked):", "",
           "| prompts | prompt tokens | block | cached s | recompute s | speed-up | same tokens |",
           "|---|---:|---:|---:|---:|---:|---|"]
    md += [f"| {r['prompts']} | {r['prompt_tokens']} | {r['block_size']} | {r['cached_s']:.2f} | "
           f"{r['recompute_s']:.2f} | {r['speedup']:.2f}x | {r['same_tokens']} |" for r in cache_rows]
    write_atomic(out.with_suffix(".md"), "\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")
    if work is not None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lm-evaluation-harness: requests per second of the ``llada_cpt`` model beside the harness's ``hf`` model.

    python benchmarks/lm_eval_harness.py [--requests 64] [--gen-requests 16] [--max-gen-toks 32] [--mc-samples 8]

A random-weight Llama of the ``tiny`` preset's shape (4 layers, hidden 128, a
1000-word word-level tokenizer) is saved in Hugging Face format and imported with
``llada-cpt convert import``; both models then serve the same harness requests in
this process, fp32 on the CPU, batch size 8:

* loglikelihood: ``hf``; ours read autoregressively (``scoring=ar``, the numbers of
  ``hf``); ours as a block-diffusion model (block size 4, ``mc_samples`` draws);
* generate_until (greedy, no stop string, ``--max-gen-toks``): ``hf``'s
  ``model.generate`` and our block sampler (block size 4, threshold 0.95);
* the estimator's spread: standard deviation of one-draw ELBO estimates per request
  (``--draws`` draws), ours (LLaDA's ``l ~ U{1..n}`` per block) against the training
  noise (``t ~ U[1e-3, 1]``, Bernoulli masks, weight ``1/t``).

Writes ``benchmarks/results/lm_eval.md`` and ``.json`` (device, versions, date).  (Not named
``lm_eval.py``: run as a script, its folder comes first on ``sys.path`` and it would shadow ``lm_eval``.)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llada_cpt.benchmarking import environment, generated_by, write_atomic  # noqa: E402

WORDS = 1000


def _hf_model(directory: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.LlamaConfig(vocab_size=WORDS, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than the default init, so that predictions depend on the context
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else 0.08 * noise)
    model.save_pretrained(directory)
    words = ["<|endoftext|>", "<unk>"] + [f"w{i}" for i in range(WORDS - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))


def _requests(kind: str, n: int, rng: random.Random, **gen):
    from lm_eval.api.instance import Instance

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(2, WORDS)}" for _ in range(k))

    out = []
    for i in range(n):
        args = (words(24), " " + words(rng.randrange(2, 5))) if kind == "loglikelihood" else (words(24), dict(gen))
        out.append(Instance(request_type=kind, doc={}, arguments=args, idx=i))
    return out


def _timed(fn, reqs, repeats: int) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(reqs)
        best = min(best, time.perf_counter() - t0)
    return len(reqs) / best, out


def _continuous_t_draw(lm, ctx: list, cont: list, g) -> float:
    """One estimate with the training noise: t ~ U[1e-3, 1] for the sequence, Bernoulli(t) masks, weight 1/t."""
    import torch

    from llada_cpt.diffusion.noise import NoiseConfig

    cfg = NoiseConfig()
    t = float(cfg.mask_ratio_min + (1 - cfg.mask_ratio_min) * torch.rand((), generator=g, dtype=torch.float64))
    hit = torch.rand(len(cont), generator=g) < t
    if not bool(hit.any()):
        return 0.0
    row = torch.tensor([False] * len(ctx) + hit.tolist())
    logp = lm._score_rows([ctx + cont], [row], [(len(ctx), cont)])[0][0]
    return sum(float(logp[k]) for k in range(len(cont)) if hit[k]) / t


def _spread(lm, reqs, draws: int) -> dict:
    import torch

    ours, training = [], []
    lm.opts.mc_samples = 1
    for r in reqs:
        ctx, cont = lm.tok_encode(r.args[0]), lm.tok_encode(r.args[0] + r.args[1])[len(lm.tok_encode(r.args[0])):]
        mine = []
        for seed in range(draws):
            lm.opts.seed = seed
            mine.append(lm._diffusion_scores([(ctx, cont)])[0][0])
        g = torch.Generator().manual_seed(0)
        theirs = [_continuous_t_draw(lm, ctx, cont, g) for _ in range(draws)]
        ours.append((statistics.mean(mine), statistics.stdev(mine), len(cont)))
        training.append((statistics.mean(theirs), statistics.stdev(theirs)))
    return {"ours_std": statistics.median(s for _, s, _ in ours),
            "training_std": statistics.median(s for _, s in training),
            "ours_mean": statistics.mean(m for m, _, _ in ours),
            "training_mean": statistics.mean(m for m, _ in training),
            "continuation_tokens": statistics.mean(n for _, _, n in ours), "requests": len(reqs), "draws": draws}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--gen-requests", type=int, default=16)
    p.add_argument("--max-gen-toks", type=int, default=32)
    p.add_argument("--mc-samples", type=int, default=8)
    p.add_argument("--draws", type=int, default=64, help="one-draw estimates per request for the spread")
    p.add_argument("--spread-requests", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting; the fastest is reported")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lm_eval"))
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    work = Path(tempfile.mkdtemp(prefix="bench-lm-eval-"))
    _hf_model(work / "hf")
    subprocess.run([sys.executable, "-m", "llada_cpt.cli", "convert", "import", "--hf", str(work / "hf"), "--out",
                    str(work / "ckpt")], check=True, capture_output=True)
    from lm_eval.models.huggingface import HFLM

    from llada_cpt.inference.harness import LladaLM

    hf = HFLM(pretrained=str(work / "hf"), dtype="float32", device="cpu", batch_size=8)
    ours = LladaLM(ckpt=str(work / "ckpt"), scoring="ar", batch_size=8, block_size=4, mc_samples=args.mc_samples)
    rng = random.Random(0)
    ll = _requests("loglikelihood", args.requests, rng)
    gen = _requests("generate_until", args.gen_requests, rng, until=[], max_gen_toks=args.max_gen_toks,
                    do_sample=False)
    rows = []

    def measure(name: str, model, fn, reqs):
        fn(reqs[:2])  # warm-up
        rate, out = _timed(fn, reqs, args.repeats)
        rows.append({"case": name, "model": model, "requests": len(reqs), "requests_per_s": rate})
        print(f"{name:>14} {model:<34} {rate:8.2f} requests/s", flush=True)
        return out

    ref = measure("loglikelihood", "hf", lambda r: hf.loglikelihood(r, disable_tqdm=True), ll)
    mine = measure("loglikelihood", "llada_cpt scoring=ar", lambda r: ours.loglikelihood(r, disable_tqdm=True), ll)
    max_diff = max(abs(a[0] - b[0]) / abs(a[0]) for a, b in zip(ref, mine))
    ours.scoring = "diffusion"
    measure("loglikelihood", f"llada_cpt diffusion B=4 mc={args.mc_samples}",
            lambda r: ours.loglikelihood(r, disable_tqdm=True), ll)
    measure("generate_until", "hf (greedy)", lambda r: hf.generate_until(r, disable_tqdm=True), gen)
    measure("generate_until", "llada_cpt sampler B=4 thr=0.95", lambda r: ours.generate_until(r, disable_tqdm=True),
            gen)
    spread = _spread(ours, ll[: args.spread_requests], args.draws)
    print(f"one-draw ELBO std per request (median): ours {spread['ours_std']:.3f}, training noise "
          f"{spread['training_std']:.3f}", flush=True)

    meta = {**environment("cpu", packages=("megatron-core", "lm_eval", "transformers")),
            "max_rel_diff_ar_vs_hf": max_diff}
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows, "spread": spread}, indent=2))
    md = [
        "# lm-evaluation-harness: requests per second",
        "",
        generated_by(meta, "benchmarks/lm_eval_harness.py", ("megatron-core", "lm_eval", "transformers"), "float32")
        + f" (shared CPU: each rate is the best of {args.repeats} runs).",
        "",
        "Model: random-weight Llama of the `tiny` preset's shape (4 layers, hidden 128, 1000-word vocabulary, "
        "weights N(0, 0.08^2)) in "
        "Hugging Face format for `hf`, imported with `llada-cpt convert import` for `llada_cpt`. Same requests, "
        f"batch size 8: {args.requests} loglikelihood requests (24-word context, 2-4 word continuation), "
        f"{args.gen_requests} generation requests (24-word prompt, {args.max_gen_toks} new tokens, greedy, no stop "
        f"string). `scoring=ar` gives the `hf` numbers (largest relative difference {max_diff:.1e}).",
        "",
        "| requests | model | requests/s |",
        "|---|---|---:|",
    ]
    md += [f"| {r['case']} | {r['model']} | {r['requests_per_s']:.2f} |" for r in rows]
    md += ["", f"ELBO estimator spread (block size 4, {spread['requests']} requests of ~"
           f"{spread['continuation_tokens']:.1f} continuation tokens, {spread['draws']} one-draw estimates each): "
           f"median standard deviation {spread['ours_std']:.3f} nats with ours (`l ~ U{{1..n_b}}` masked per block, "
           f"weight `n_b/l`) against {spread['training_std']:.3f} with the training noise (`t ~ U[1e-3,1]`, "
           f"Bernoulli masks, weight `1/t`); means {spread['ours_mean']:.2f} / {spread['training_mean']:.2f}."]
    write_atomic(out.with_suffix(".md"), "\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

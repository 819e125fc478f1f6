"""``llada-cpt eval``: validation loss / perplexity (BDLM ELBO), or math answer accuracy.

``llada-cpt eval --ckpt PATH [--data PREFIX ...] [--block-size B]`` evaluates the
block-diffusion ELBO at block size ``B`` on packed sequences of the given
indexed datasets (default: the run's own validation data) with exactly the
training loop's validation (:mod:`llada_cpt.training.validation`: noise seeded
by sample position, salt ``valid`` as in training, so the first samples
reproduce the run's logged validation loss) and
:func:`llada_cpt.training.step.forward_backward` with ``forward_only=True``.
``--mc-samples k`` averages ``k`` independent noise draws.

``llada-cpt eval --ckpt PATH --math questions.jsonl`` generates an answer to each
``{question, ground_truth_answer}`` (the question plus ``--instruction``, in the
chat template) and scores the final ``\\boxed{}`` with
:class:`llada_cpt.rl.verifier.MathVerifier`; it prints accuracy and TPF.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..arg_types import int_range
from ..errors import ConfigError, DataError
from .cli import (
    add_sampler_arguments,
    check_output_path,
    generate_distributed,
    is_rank0,
    relaunch,
    sampler_config,
    warn_settings,
    write_jsonl,
)

__all__ = ["main", "validation_loss", "score_math", "DEFAULT_INSTRUCTION"]

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llada-cpt eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=None,
                   help="indexed dataset prefix(es) for validation loss (default: the run's validation data)")
    p.add_argument("--math", default=None, help="JSONL of {question, ground_truth_answer}: answer accuracy")
    p.add_argument("--seq-length", type=int_range(1), default=None, help="default: the run's data.seq_length")
    p.add_argument("--micro-batch-size", type=int_range(1), default=4)
    p.add_argument("--max-samples", type=int_range(1), default=64, help="packed sequences evaluated (loss)")
    p.add_argument("--mc-samples", type=int_range(1), default=1, help="noise draws per sequence (loss)")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="appended to each question ('' for none)")
    p.add_argument("--limit", type=int_range(1), default=None, help="first N questions only")
    p.add_argument("--output", default=None, help="--math: JSONL with each question's completion and verdict")
    add_sampler_arguments(p, max_new_tokens=256)
    args = p.parse_args(list(argv))
    if args.data is not None and args.math is not None:
        p.error("--data and --math are separate evaluations; pass one of them")
    return args


def _eval_prefixes(args: argparse.Namespace, cfg) -> List:
    if args.data:
        for prefix in args.data:
            if not Path(prefix + ".bin").is_file() or not Path(prefix + ".idx").is_file():
                raise DataError(f"`{prefix}` is not an indexed dataset prefix (no {prefix}.bin / .idx); "
                                "pass the prefix written by `llada-cpt preprocess`")
        return list(args.data)
    if cfg.data.valid_data:
        from ..data.packed import blend_from_config

        return blend_from_config(cfg.data.valid_data)
    if cfg.data.demo:
        from ..data.demo_corpus import ensure_demo_data

        return [ensure_demo_data(cfg.data.cache_dir).valid_prefix]
    raise ConfigError("the checkpoint's run has no validation data (data.valid_data); pass --data PREFIX")


def validation_loss(m, prefixes: List, block_size: int, seq_length: int, micro_batch_size: int = 4,
                    max_samples: int = 64, mc_samples: int = 1) -> dict:
    """ELBO loss / perplexity of ``m`` (an ``InferenceModel``) on packed sequences; same on every rank.

    The batches and the loss are the training loop's validation (:mod:`llada_cpt.training.validation`).
    """
    from megatron.core import parallel_state as ps

    from ..data.packed import PackedDataset
    from ..diffusion.seeded import noise_config
    from ..training.step import forward_backward
    from ..training.validation import elbo_loss, packed_eval_batches

    cfg = m.config
    if block_size < seq_length and seq_length % block_size:
        raise ConfigError(f"block size {block_size} does not divide the sequence length {seq_length}; "
                          "pick a divisor (or --seq-length a multiple of it)")
    if micro_batch_size < 1 or max_samples < 1 or mc_samples < 1:
        raise ConfigError("--micro-batch-size, --max-samples and --mc-samples must be >= 1")
    cache = None if cfg.data.cache_dir is None else f"{cfg.data.cache_dir}/index_cache"
    ds = PackedDataset(prefixes, seq_length, seed=cfg.data.seed, cache_dir=cache)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_step = micro_batch_size * dp
    n = min(len(ds), max_samples) // per_step * per_step
    if n == 0:
        raise DataError(f"the evaluation data holds {len(ds)} sequences of {seq_length} tokens, fewer than one "
                        f"micro-batch per data-parallel rank ({per_step}); lower --micro-batch-size or --seq-length")
    batches = []
    for mc in range(mc_samples):
        groups = packed_eval_batches(ds, micro_batch_size, dp_rank, dp, n // per_step, block_size, m.info.mask_id,
                                     noise_config(cfg.diffusion), cfg.train.seed,
                                     salt="valid" if mc == 0 else f"valid{mc}")
        batches += [b for group in groups for b in group]
    m.model.eval()
    r = elbo_loss([batches], lambda step: forward_backward([m.model], step, forward_only=True))
    return {"loss": r["loss"], "ppl": r["ppl"], "sequences": n, "tokens": int(r["tokens"]),
            "block_size": block_size, "seq_length": seq_length, "mc_samples": mc_samples}


def score_math(records: Sequence[dict], completions: Sequence[str]) -> List[bool]:
    """Verdict per question: the last ``\\boxed{}`` of the completion equals ``ground_truth_answer``."""
    from ..rl.verifier import MathVerifier

    verifier = MathVerifier()
    try:
        return [bool(verifier(c, r["ground_truth_answer"])) for r, c in zip(records, completions)]
    finally:
        verifier.close()


def _run_loss(args, info) -> None:
    from .engine import block_size_warning, load_model_for_inference

    cfg = info.config
    block = info.trained_block_size if args.block_size is None else args.block_size
    L = cfg.data.seq_length if args.seq_length is None else args.seq_length
    prefixes = _eval_prefixes(args, cfg)
    warning = block_size_warning(info, block)
    if warning and is_rank0():
        print(warning, file=sys.stderr, flush=True)
    m = load_model_for_inference(info, tp=args.tp, precision=args.precision, seed=args.seed)
    r = validation_loss(m, prefixes, block, L, args.micro_batch_size, args.max_samples, args.mc_samples)
    if is_rank0():
        print(f"validation loss {r['loss']:.4f} | perplexity {r['ppl']:.2f} | block size {block} | "
              f"{r['sequences']} sequences x {L} tokens | {r['mc_samples']} noise draw(s)", flush=True)


def _run_math(args, info) -> None:
    from .engine import load_model_for_inference
    from .prompts import default_template, encode_record, read_records
    from .sampler import check_prompts

    records = read_records(args.math, required=("question", "ground_truth_answer"))
    if args.limit is not None:
        records = records[: max(args.limit, 0)]
    output = check_output_path(args.output, [args.math])
    template = args.chat_template or default_template(info.stage)
    suffix = f"\n{args.instruction}" if args.instruction else ""
    names = [f"{args.math}:{r['_line']}" for r in records]
    prompts = [encode_record({"prompt": r["question"] + suffix}, info.tokenizer, template, name)
               for r, name in zip(records, names)]
    cfg = sampler_config(args, info)
    warn_settings(info, cfg, prompts)
    check_prompts(prompts, cfg, names)
    m = load_model_for_inference(info, tp=args.tp, precision=args.precision, seed=args.seed)
    out = generate_distributed(m, prompts, cfg, show_progress=not args.quiet)
    if out is None:
        return
    verdicts = score_math(records, [r.text for r in out])
    correct = sum(verdicts)
    if output is not None:
        write_jsonl(output, [{"question": rec["question"], "ground_truth_answer": rec["ground_truth_answer"],
                              "correct": ok, **r.to_dict()} for rec, r, ok in zip(records, out, verdicts)])
    print(f"math accuracy {correct}/{len(records)} = {100.0 * correct / len(records):.1f}% | block size "
          f"{cfg.block_size} | threshold {cfg.threshold} | {out.stats.summary()}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    args = _parse(argv)
    code = relaunch("eval", argv, args)
    if code is not None:
        return code
    from ..training.distributed import destroy
    from .engine import inspect_checkpoint

    info = inspect_checkpoint(args.ckpt)
    if args.math is not None:
        _run_math(args, info)
    else:
        _run_loss(args, info)
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

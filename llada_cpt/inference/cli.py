"""``llada-cpt generate``: block-diffusion sampling from a checkpoint.

``llada-cpt generate --ckpt RUN_OR_ITER (--prompt TEXT ... | --input prompts.jsonl) [--output out.jsonl]
[--chat-template auto|tokenizer|plain|chatml|raw] [--block-size B] [--threshold 0.95] [--temperature 0]
[--max-new-tokens N] [--tp N --nproc N]``

Input JSONL: ``{"prompt": ...}`` or ``{"messages": [...]}`` per line.  Output
JSONL (written atomically once everything is generated): one object per
prompt with ``text`` (completion up to EOS), ``ids`` and ``step_map`` (all
generated positions, for RL replay), ``prompt_ids``, ``finish_reason`` and
per-sequence ``stats``.  Without ``--output`` the completions are printed.
The statistics (forward passes, TPF, tokens/s) are printed at the end.

``--nproc N`` starts N local ranks: ``--tp`` of them hold one model replica
(tensor parallel, decoding in lockstep) and the prompts are split over the
``N / tp`` replicas.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..arg_types import float_range, int_range
from ..errors import ConfigError, DataError
from ..files import write_atomic
from .prompts import CHAT_TEMPLATES, default_template, encode_record, read_records
from .sampler import GenerationBatch, GenerationResult, GenerationStats, SamplerConfig, check_prompts, token_budget

__all__ = ["main", "add_sampler_arguments", "sampler_config", "generate_distributed", "relaunch", "write_jsonl",
           "check_output_path", "warn_settings", "is_rank0"]


def add_sampler_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """Checkpoint, parallel and decoding options shared by ``generate`` and ``eval --math``."""
    p.add_argument("--ckpt", required=True, help="run directory (follows `latest`) or iter_* checkpoint directory")
    p.add_argument("--chat-template", choices=CHAT_TEMPLATES, default=None,
                   help="prompt wrapping; default: raw for a CPT checkpoint, auto otherwise")
    p.add_argument("--block-size", type=int_range(1), default=None, help="default: the checkpoint's trained block size")
    p.add_argument("--threshold", type=float_range(0), default=0.95, help="commit positions more confident than this")
    p.add_argument("--min-tokens-per-step", type=int_range(1), default=1,
                   help="low-confidence fallback: commit at least k")
    p.add_argument("--max-steps-per-block", type=int_range(1), default=None, help="then commit the rest (default: B)")
    p.add_argument("--temperature", type=float_range(0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float_range(0, 1, lo_open=True), default=1.0)
    p.add_argument("--top-k", type=int_range(0), default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=int_range(1), default=max_new_tokens)
    p.add_argument("--batch-size", type=int_range(1), default=8, help="sequences decoded together per replica")
    p.add_argument("--seed", type=int_range(0), default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step (slow; reference)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tp", type=int_range(1), default=1,
                   help="tensor-parallel size (needs --nproc N, a multiple of it)")
    p.add_argument("--nproc", type=int_range(1), default=None, help="launch N local processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def sampler_config(args: argparse.Namespace, info) -> SamplerConfig:
    """Decoding settings from the options; ids, vocabulary and context from the checkpoint ``info``."""
    cfg = SamplerConfig(
        block_size=info.trained_block_size if args.block_size is None else args.block_size, threshold=args.threshold,
        min_tokens_per_step=args.min_tokens_per_step, max_steps_per_block=args.max_steps_per_block,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        use_cache=not args.no_cache, batch_size=args.batch_size, seed=args.seed, mask_id=info.mask_id,
        eos_id=info.eos_id, vocab_size=info.tokenizer.vocab_size, context_length=info.context_length)
    cfg.validate()
    return cfg



def relaunch(command: str, argv: Sequence[str], args: argparse.Namespace) -> Optional[int]:
    """Check ``--tp`` against the ranks, then start ``--nproc`` of them running this command (None: already a
    rank, or a single process)."""
    under_launcher = "WORLD_SIZE" in os.environ
    if args.tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {args.tp}")
    if under_launcher:
        world = int(os.environ["WORLD_SIZE"])
        if world % args.tp:
            raise ConfigError(f"{world} processes cannot hold replicas of --tp {args.tp}; use a multiple of it")
        return None
    if args.nproc is None or args.nproc == 1:
        if args.tp > 1:
            raise ConfigError(f"--tp {args.tp} needs {args.tp} processes; add --nproc {args.tp}")
        return None
    if args.nproc % args.tp:
        raise ConfigError(f"--nproc {args.nproc} is not a multiple of --tp {args.tp}")
    from ..runtime.launch import relaunch_local

    return relaunch_local(command, argv, args.nproc)


def warn_settings(info, cfg: SamplerConfig, prompts: Sequence[Sequence[int]]) -> None:
    """Rank 0 prints the warnings about settings the checkpoint was not trained for (not errors)."""
    from .engine import block_size_warning

    if not is_rank0():
        return
    warning = block_size_warning(info, cfg.block_size)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    trained_L = info.config.data.seq_length
    if prompts and max(len(p) for p in prompts) + cfg.max_new_tokens > trained_L:
        print(f"note: generation may reach positions beyond the trained sequence length {trained_L}",
              file=sys.stderr, flush=True)


def is_rank0() -> bool:
    """Rank 0 of the launch (before torch.distributed is initialised: from the launcher's RANK)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def generate_distributed(m, prompts: List[List[int]], cfg: SamplerConfig, show_progress: bool = True
                         ) -> Optional[GenerationBatch]:
    """Split ``prompts`` over the data-parallel replicas, generate, gather on rank 0 (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from .generation import generate

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(range(dp_rank, len(prompts), dp))
    local = m.fill_defaults(cfg)
    local.seed = cfg.seed + dp_rank
    total = sum(token_budget(len(prompts[i]), local) for i in mine)
    bar = tqdm(total=total, unit="tok", desc="generate", file=sys.stderr, dynamic_ncols=True,
               disable=not (show_progress and is_rank0()))
    try:
        out = generate(m, [prompts[i] for i in mine], local, progress=bar.update)
    finally:
        bar.close()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return out
    tp_rank = ps.get_tensor_model_parallel_rank()
    payload = (mine, list(out), out.stats) if tp_rank == 0 else None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    if dist.get_rank() != 0:
        return None
    results: List[Optional[GenerationResult]] = [None] * len(prompts)
    stats = GenerationStats()
    seconds = 0.0
    for item in gathered:
        if item is None:
            continue
        idx, res, st = item
        for i, r in zip(idx, res):
            results[i] = r
        seconds = max(seconds, st.seconds)  # replicas run concurrently
        st.seconds = 0.0
        stats.add(st)
    stats.seconds = seconds
    return GenerationBatch(results, stats)


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """All rows or nothing: written to a temporary file and renamed into place."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def check_output_path(output: Optional[str], inputs: Sequence[Optional[str]] = ()) -> Optional[Path]:
    if output is None:
        return None
    out = Path(output)
    if not out.parent.is_dir():
        raise DataError(f"output directory `{out.parent}` does not exist; create it first")
    if any(i is not None and Path(i).resolve() == out.resolve() for i in inputs):
        raise DataError(f"--output `{out}` is also the input; write the results to another file")
    return out


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llada-cpt generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    src.add_argument("--input", help="JSONL with {prompt} or {messages} per line")
    p.add_argument("--output", help="JSONL with text, ids, step_map and stats per prompt")
    add_sampler_arguments(p)
    return p.parse_args(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    args = _parse(argv)
    output = check_output_path(args.output, [args.input])
    code = relaunch("generate", argv, args)
    if code is not None:
        return code
    from .engine import inspect_checkpoint, load_model_for_inference

    info = inspect_checkpoint(args.ckpt)
    records = read_records(args.input) if args.input else [{"prompt": t} for t in args.prompt]
    template = args.chat_template or default_template(info.stage)
    names = [f"{args.input}:{r['_line']}" if args.input else f"prompt {i}" for i, r in enumerate(records)]
    prompts = [encode_record(r, info.tokenizer, template, name) for r, name in zip(records, names)]
    cfg = sampler_config(args, info)
    block = cfg.block_size
    warn_settings(info, cfg, prompts)
    check_prompts(prompts, cfg, names)  # before the model is built: bad input fails fast
    m = load_model_for_inference(info, tp=args.tp, precision=args.precision, seed=args.seed)
    out = generate_distributed(m, prompts, cfg, show_progress=not args.quiet)
    if out is not None:
        if output is not None:
            rows = []
            for i, (rec, r) in enumerate(zip(records, out)):
                rows.append({"index": i, **{k: v for k, v in rec.items() if k != "_line"}, **r.to_dict()})
            write_jsonl(output, rows)
            print(f"wrote {len(rows)} generations to {output}")
        else:
            for i, r in enumerate(out):
                if len(out) > 1:
                    print(f"=== {i}: {r.finish_reason}, {r.num_tokens} tokens, TPF {r.tpf:.2f} ===")
                print(r.text)
        print(f"block size {block} | threshold {cfg.threshold} | {out.stats.summary()}", flush=True)
    from ..training.distributed import destroy

    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

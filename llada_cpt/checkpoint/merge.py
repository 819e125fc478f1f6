"""Top-k checkpoint averaging: ``llada-cpt merge``.

Averaging the weights of the best few checkpoints of a run (by validation
perplexity) is a cheap, reliable gain at the end of CPT / SFT (LLaDA2.0 report,
checkpoint merging).  The merge is *streaming*: it walks the stored chunks of
every model tensor (one layer of one parameter, or one TP shard of it; chunks over
``MAX_REGION_BYTES`` cut into row runs), reads that region from each input,
accumulates ``sum_i w_i * x_i`` in fp32 (fp64 stays fp64) and writes it back in the
stored dtype while the next region is computed, so peak memory is two regions plus
slab buffers, never the model.  Chunks are read in global coordinates, so inputs
saved with different TP/PP/EP layouts merge.

Output layout: ``OUT`` is a *run directory* holding one checkpoint and a
``latest`` pointer::

    OUT/iter_<max iteration of the inputs>/   metadata.json, common.pt, .metadata, *.distcp,
                                              config.yaml (of the first input), metrics.json (the merge)
    OUT/latest

so ``train.init_from=OUT``, conversion and generation (all through
:func:`llada_cpt.checkpoint.paths.resolve_checkpoint`) load it like any run.
Only model weights are written: **optimizer state, scheduler and loop state are
not merged**, so the result starts a new stage; it cannot resume the old one.
Non-floating tensors (integer buffers) and ShardedObject items (e.g.
``_extra_state``) are copied from the first input.

Safety: inputs must have the same tensors, shapes, dtypes and model config;
``OUT`` must not exist and must not lie inside an input; the result is written
to ``OUT.tmp-<pid>`` and renamed only when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..arg_types import int_range
from ..errors import partial_output
from ..files import fsync_path, fsync_tree
from . import paths as ckpt
from .info import CheckpointInfo
from .io import Region, TensorInfo, TorchDistCheckpoint
from .paths import (
    CONFIG_FILE,
    METRICS_FILE,
    CheckpointError,  # noqa: F401
)
from .raw import weighted_sum
from .selection import DEFAULT_METRIC, MergeError, Selection, normalise_weights, score, select_explicit, select_top_k  # noqa: F401
from .verify import verify_checkpoint
from .writer import regions_bytes, write_order, write_torch_dist

__all__ = [
    "MergeError",
    "CheckpointError",
    "Selection",
    "select_top_k",
    "select_explicit",
    "normalise_weights",
    "MergePlan",
    "plan_merge",
    "merge_checkpoints",
    "main",
]

# output regions are at most this large (bigger stored chunks are cut in rows): peak memory ~2 of them
MAX_REGION_BYTES = 64 * 2**20
DEFAULT_THREADS = 2  # slab workers per region: the sums are memory-bound, 2 already hide the reads
# DCP keys of everything that is not model weights (Megatron optimizers save under `optimizer.`)
NON_MODEL_PREFIXES = ("optimizer.",)
OPTIMIZER_NOTE = ("optimizer state is not merged: the output holds model weights only "
                  "(start a new stage from it with train.init_from=OUT; it cannot resume the old run)")


def _is_model_key(key: str) -> bool:
    return not key.startswith(NON_MODEL_PREFIXES)


def _check_same_model_config(paths: Sequence[Path]) -> None:
    configs = [(p, CheckpointInfo.read(p).architecture) for p in paths]
    configs = [(p, c) for p, c in configs if c is not None]
    if not configs:
        return
    ref_path, ref = configs[0]
    for path, cfg in configs[1:]:
        for name in sorted(set(ref) | set(cfg)):
            if ref.get(name) != cfg.get(name):
                raise MergeError(
                    f"checkpoints have different architectures: `model.{name}` is {ref.get(name)!r} in "
                    f"{ref_path}/config.yaml but {cfg.get(name)!r} in {path}/config.yaml; only checkpoints "
                    "of the same model can be merged")


@dataclass
class MergePlan:
    """Validated inputs and the tensors to write (regions = the first input's stored chunks)."""

    inputs: List[TorchDistCheckpoint]
    tensors: List[TensorInfo]
    objects: List[str]
    averaged: List[str]  # floating keys (weighted mean)
    copied: List[str]  # non-floating keys (taken from the first input)

    @property
    def input_bytes(self) -> int:
        return regions_bytes(self.tensors) * len(self.inputs)

    @property
    def largest_region_bytes(self) -> int:
        return max((r.numel * t.dtype.itemsize for t in self.tensors for r in t.chunks), default=0)


def split_regions(chunks: Sequence[Region], itemsize: int, max_bytes: Optional[int] = None) -> Tuple[Region, ...]:
    """The output regions: the stored chunks, those over ``max_bytes`` cut into runs of whole rows.

    Why: the merge holds two output regions in memory, and a 150k-vocabulary embedding
    is one multi-GB chunk.  A chunk is cut along its first dimension longer than 1
    (the ones before it have size 1), so every piece is one contiguous run of the
    input chunk (the direct read path still applies) and of the global tensor;
    Megatron's loader reassembles any chunking.  A single row over the limit stays whole.
    """
    max_bytes = MAX_REGION_BYTES if max_bytes is None else max_bytes
    out: List[Region] = []
    for chunk in chunks:
        if chunk.numel * itemsize <= max_bytes:
            out.append(chunk)
            continue
        dim = next(d for d, n in enumerate(chunk.sizes) if n > 1)
        row = chunk.numel // chunk.sizes[dim] * itemsize
        step = max(1, max_bytes // row)
        for start in range(0, chunk.sizes[dim], step):
            n = min(step, chunk.sizes[dim] - start)
            offsets = chunk.offsets[:dim] + (chunk.offsets[dim] + start,) + chunk.offsets[dim + 1:]
            out.append(Region(offsets, chunk.sizes[:dim] + (n,) + chunk.sizes[dim + 1:]))
    return tuple(out)


def plan_merge(paths: Sequence[str | Path]) -> MergePlan:
    """Open the inputs and check that they can be merged; names the first mismatching tensor."""
    paths = [Path(p) for p in paths]
    for p in paths:  # a truncated shard would otherwise fail half-way through the output
        verdict = verify_checkpoint(p, weights_only=True)
        if not verdict.ok:
            raise MergeError(f"checkpoint {p} is incomplete or corrupt ({verdict.problems[0]}); merge complete "
                             f"ones only (`llada-cpt checkpoint verify {p.parent}` lists them; pass them with --ckpts)")
    _check_same_model_config(paths)
    inputs = [TorchDistCheckpoint(p) for p in paths]
    first = inputs[0]
    keys = sorted(k for k in first.tensors if _is_model_key(k))
    objects = sorted(k for k in first.objects if _is_model_key(k))
    if not keys:
        raise MergeError(f"`{first.path}` holds no model tensors (only {sorted(first.tensors)[:3]}...); "
                         "pass checkpoints saved by training or conversion")
    for other in inputs[1:]:
        other_keys = sorted(k for k in other.tensors if _is_model_key(k))
        other_objects = sorted(k for k in other.objects if _is_model_key(k))
        for mine, theirs in ((keys, other_keys), (objects, other_objects)):
            if mine != theirs:
                key = sorted(set(mine) ^ set(theirs))[0]
                has, lacks = (first, other) if key in mine else (other, first)
                raise MergeError(f"checkpoints hold different tensors: `{key}` is in {has.path} but not in "
                                 f"{lacks.path}; only checkpoints of the same model can be merged")
        for key in keys:
            a, b = first.tensors[key], other.tensors[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise MergeError(
                    f"tensor `{key}` is {tuple(a.shape)} {a.dtype} in {first.path} but "
                    f"{tuple(b.shape)} {b.dtype} in {other.path}; only checkpoints of the same model "
                    "(and precision) can be merged")
    tensors = []
    for k in keys:
        info = first.tensors[k]
        # cut big chunks only where every input stores the same chunks: the pieces are then read directly;
        # through DCP each piece would deserialise whole stored chunks again
        same = all(set(o.tensors[k].chunks) == set(info.chunks) for o in inputs[1:])
        regions = split_regions(info.chunks, info.dtype.itemsize) if same else info.chunks
        tensors.append(TensorInfo(k, info.shape, info.dtype, regions))
    averaged = [t.key for t in tensors if t.dtype.is_floating_point]
    copied = [t.key for t in tensors if not t.dtype.is_floating_point]
    return MergePlan(inputs, tensors, objects, averaged, copied)


def _check_output(out: Path, protected: Sequence[Path]) -> None:
    if out.exists():
        raise MergeError(f"output `{out}` already exists; merge never overwrites, choose a new --out")
    target = out.resolve()
    for p in protected:
        src = Path(p).resolve()
        if target == src or src in target.parents:
            raise MergeError(f"output `{out}` is inside the input `{p}`; write the merge outside the "
                             "input checkpoints and run directories")


class _Averager:
    """Produces the output regions: ``sum_i w_i * x_i`` over the inputs, accumulated in fp32 (fp64 stays fp64).

    Direct path (every input stores the region as one plain run of bytes, the usual
    case): slabs are ``preadv``'d from the files into small reused buffers and summed in
    cache (:func:`llada_cpt.checkpoint.raw.weighted_sum`), ``threads`` workers per region.
    Otherwise the region is read through DCP (``read_region``) into a region-sized
    accumulator.

    Pipelining: while DCP's writer serialises region ``i`` (returned from ``__call__``),
    region ``i + 1`` is computed in a background thread into the other of two output
    buffers.  A buffer is reused for region ``i + 2`` only after the writer asked for
    ``i + 1``, i.e. after it finished writing ``i`` (one writer thread, in plan order, see
    ``checkpoint.io._LazySavePlanner``); asked out of order, it computes synchronously.
    Reusing buffers matters: fresh multi-100-MB allocations cost page faults comparable
    to the arithmetic.  Peak memory: two output regions plus the slab buffers.
    """

    def __init__(self, plan: MergePlan, weights: Sequence[float], progress, threads: int = 1):
        self.plan, self.weights, self.progress = plan, list(weights), progress
        self.order = write_order(plan.tensors)
        self.position = {(t.key, r.offsets): i for i, (t, r) in enumerate(self.order)}
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="merge") if threads > 1 else None
        self.ahead = ThreadPoolExecutor(1, thread_name_prefix="merge-ahead")
        self.scratch = [{} for _ in range(threads)]
        self.slots: List[Optional[torch.Tensor]] = [None, None]
        self.pending: Optional[Tuple[int, Future]] = None
        self.direct = self.through_dcp = 0

    def close(self) -> None:
        if self.pending is not None:
            self.pending[1].cancel()
        self.ahead.shutdown(wait=True)
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _output(self, slot: int, region: Region, dtype: torch.dtype) -> torch.Tensor:
        """A region-sized tensor in the slot's bytes (its storage is exactly the region: DCP's writer
        clones tensors whose storage is larger).  Slots are sized by the largest region and allocated
        once, so pages touched by one region serve the next whatever their shapes."""
        nbytes = region.numel * dtype.itemsize
        if nbytes == 0:
            return torch.empty(region.sizes, dtype=dtype)
        if self.slots[slot] is None:
            self.slots[slot] = torch.empty(self.plan.largest_region_bytes, dtype=torch.uint8)
        raw = memoryview(self.slots[slot].numpy())[:nbytes]
        return torch.frombuffer(raw, dtype=dtype).view(region.sizes)

    def _compute(self, index: int) -> torch.Tensor:
        tensor, region = self.order[index]
        inputs = self.plan.inputs
        out = self._output(index % 2, region, tensor.dtype)
        sources = [src.raw_source(tensor.key, region) for src in inputs] if tensor.dtype.is_floating_point else []
        if sources and all(s is not None for s in sources):
            weighted_sum(sources, self.weights, out, self.pool, self.scratch)
            self.direct += 1
        elif not tensor.dtype.is_floating_point:
            inputs[0].read_region(tensor.key, region, out)
            self.through_dcp += 1
        else:
            acc = torch.empty(region.sizes, dtype=torch.promote_types(tensor.dtype, torch.float32))
            inputs[0].read_region(tensor.key, region, acc)
            acc.mul_(self.weights[0])
            for src, w in zip(inputs[1:], self.weights[1:]):
                src.read_region(tensor.key, region, acc, alpha=w)
            out.copy_(acc)
            self.through_dcp += 1
        self.progress.update(region.numel * tensor.dtype.itemsize * len(inputs))
        return out

    def __call__(self, tensor: TensorInfo, region: Region) -> torch.Tensor:
        index = self.position[(tensor.key, region.offsets)]
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == index:
            out = pending[1].result()
        else:
            if pending is not None:  # asked out of order: let it finish, then compute this one here
                pending[1].result()
            out = self._compute(index)
        if index + 1 < len(self.order):
            self.pending = (index + 1, self.ahead.submit(self._compute, index + 1))
        return out


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
                disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True)  # None: TTY only


def merge_checkpoints(selection: Selection, out: str | Path, progress: bool = True,
                      plan: Optional[MergePlan] = None, threads: int = DEFAULT_THREADS) -> Path:
    """Write the weighted average of the selection's model weights to the run directory ``out``.

    Returns the checkpoint directory (``out/iter_<max iteration>``).  Nothing
    named ``out`` exists unless the whole merge succeeded.  ``threads`` workers
    share each region (reads and arithmetic of different slabs overlap); memory
    grows only by their slab buffers.
    """
    out = Path(out)
    _check_output(out, selection.protected + [c.path for c in selection.chosen])
    plan = plan or plan_merge([c.path for c in selection.chosen])
    iteration = max(c.iteration for c in selection.chosen)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    name = ckpt.checkpoint_name(iteration)
    # The slab copies and adds are memory-bound and cache-sized: PyTorch's intra-op threads
    # only spin (5-10x the CPU time on a busy node); `threads` splits each region instead.
    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)
    averager = None
    try:
        with partial_output(tmp, out, f"writing the merged checkpoint in {out.parent}", "the merge"):
            target = tmp / name
            target.mkdir(parents=True)
            common = {k: v for k, v in plan.inputs[0].common().items() if k.startswith("model")}
            objects = {k: plan.inputs[0].read_object(k) for k in plan.objects}
            with _progress_bar(plan.input_bytes, progress) as bar:
                averager = _Averager(plan, selection.weights, bar, threads)
                write_torch_dist(target, plan.tensors, averager, objects, common)
            if progress:
                print(f"merge: {averager.direct} regions read directly from the files, {averager.through_dcp} "
                      "through torch.distributed.checkpoint", file=sys.stderr)
            config = selection.chosen[0].path / CONFIG_FILE
            if config.is_file():
                shutil.copyfile(config, target / CONFIG_FILE)
            (target / METRICS_FILE).write_text(json.dumps(_merge_metrics(selection, plan, iteration), indent=2))
            (tmp / ckpt.LATEST).write_text(name + "\n")
            fsync_tree(tmp)
            if out.exists():  # appeared while we were writing
                raise MergeError(f"output `{out}` appeared during the merge; nothing was written to it")
            os.rename(tmp, out)
    finally:
        torch.set_num_threads(intra_op)
        if averager is not None:
            averager.close()
        for src in plan.inputs:
            src.close()
    fsync_path(out.parent)  # make the rename itself durable
    return out / name


def _merge_metrics(selection: Selection, plan: MergePlan, iteration: int) -> dict:
    metric = selection.metric or DEFAULT_METRIC
    uniform = len(set(round(w, 12) for w in selection.weights)) == 1
    return {
        "iteration": iteration,
        "merged": True,
        "merge": {
            "method": "uniform" if uniform else "weighted",
            "metric": metric,
            "mode": selection.mode,
            "optimizer_merged": False,
            "averaged_tensors": len(plan.averaged),
            "copied_tensors": plan.copied,
            "sources": [
                {"path": str(c.path.resolve()), "iteration": c.iteration, "weight": w,
                 metric: score(c, metric)[0]}
                for c, w in zip(selection.chosen, selection.weights)
            ],
        },
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llada-cpt merge",
        description="Average the model weights of the top-k checkpoints of a run (or of given checkpoints) "
                    "into a new checkpoint. " + OPTIMIZER_NOTE + ".")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="run directory (checkpoint.save_dir) whose iter_* checkpoints are ranked")
    src.add_argument("--ckpts", nargs="+", metavar="CKPT", help="explicit iter_* or run directories")
    p.add_argument("--top-k", type=int_range(1), help="number of best checkpoints to average (with --run-dir)")
    p.add_argument("--metric", default=DEFAULT_METRIC, help="metrics.json field to rank by (default: val_ppl)")
    p.add_argument("--mode", choices=("min", "max"), default="min", help="min: lower is better (default)")
    p.add_argument("--weights", nargs="+", type=float,
                   help="one weight per checkpoint (rank order with --top-k), normalised to sum 1")
    p.add_argument("--out", help="new run directory for the merged checkpoint (must not exist)")
    p.add_argument("--dry-run", action="store_true", help="print the selection and checks; write nothing")
    p.add_argument("--threads", type=int_range(1), default=DEFAULT_THREADS,
                   help=f"worker threads sharing each region (default {DEFAULT_THREADS}); faster on idle "
                        "multi-core machines, memory grows only by a few MB per thread")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.run_dir is not None:
        if args.top_k is None:
            raise MergeError("--run-dir needs --top-k K (how many of the best checkpoints to average)")
        sel = select_top_k(args.run_dir, args.top_k, args.metric, args.mode, args.weights)
        print(f"merge: top-{args.top_k} of {len(sel.chosen) + len(sel.skipped)} checkpoints in {args.run_dir} "
              f"by {args.metric} ({args.mode}):")
    else:
        if args.top_k is not None:
            raise MergeError("--top-k ranks the checkpoints of --run-dir; with --ckpts every listed checkpoint "
                             "is merged")
        sel = select_explicit(args.ckpts, args.weights, args.metric)
        print(f"merge: {len(sel.chosen)} given checkpoints:")
    print(sel.describe())
    if args.out is None and not args.dry_run:
        raise MergeError("--out is required (a new run directory for the merged checkpoint)")
    if args.out is not None:
        _check_output(Path(args.out), sel.protected + [c.path for c in sel.chosen])
    plan = plan_merge([c.path for c in sel.chosen])
    print(f"{len(plan.averaged)} tensors averaged, {len(plan.copied)} non-float tensors and "
          f"{len(plan.objects)} objects copied from the first input "
          f"({_human_bytes(plan.input_bytes // len(plan.inputs))} of weights per checkpoint)")
    print(OPTIMIZER_NOTE)
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    path = merge_checkpoints(sel, args.out, progress=not args.no_progress, plan=plan, threads=args.threads)
    print(f"wrote {path} (use train.init_from={args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

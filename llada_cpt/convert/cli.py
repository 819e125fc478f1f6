"""``llada-cpt convert import|export``: Hugging Face <-> our Megatron checkpoints.

  llada-cpt convert import --hf HF_DIR --out RUN_DIR [--tokenizer PATH]
                           [--tp N] [--pp N] [--ep N] [--nproc N] [--precision auto|fp32|bf16]
  llada-cpt convert export --ckpt RUN_OR_ITER_DIR --out HF_DIR [--hf-template HF_DIR]
                           [--dtype auto|fp32|bf16] [--max-shard-size 5GB]

``import`` writes a run directory (``iter_0000000`` + ``latest`` + ``tokenizer/``)
that ``train.init_from=RUN_DIR`` loads; it runs on ``--nproc`` local ranks
(default TP x PP x EP), or on the ranks of an existing torchrun / Slurm launch.
The checkpoint reshards to other layouts, except that the padded vocabulary
depends on the TP size (``make_vocab_size_divisible_by * tp``), so import with
the TP size you will train with.  ``export`` runs in one process.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..arg_types import int_range
from ..config.schema import ParallelConfig

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llada-cpt convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", metavar="{import,export}")
    imp = sub.add_parser("import", help="Hugging Face directory -> llada-cpt run directory")
    imp.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + *.safetensors)")
    imp.add_argument("--out", required=True, help="new run directory to create")
    imp.add_argument("--tokenizer", help="tokenizer file or directory (default: the one in --hf)")
    imp.add_argument("--tp", type=int_range(1), default=1, help="tensor-parallel size of the target run")
    imp.add_argument("--pp", type=int_range(1), default=1, help="pipeline-parallel size of the target run")
    imp.add_argument("--ep", type=int_range(1), default=1, help="expert-parallel size of the target run")
    imp.add_argument("--nproc", type=int_range(1), default=None, help="local ranks to launch (default TP x PP x EP)")
    imp.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="auto (bf16 on GPU, fp32 on CPU), fp32 or bf16")
    exp = sub.add_parser("export", help="llada-cpt checkpoint -> Hugging Face directory")
    exp.add_argument("--ckpt", required=True, help="run directory (follows `latest`) or iter_* directory")
    exp.add_argument("--out", required=True, help="new Hugging Face directory to create")
    exp.add_argument("--hf-template", help="HF model directory whose config.json supplies the other fields")
    exp.add_argument("--dtype", default="auto", help="auto (as stored), fp32 or bf16")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    return p


def _import(args, argv: Sequence[str]) -> int:
    from .hf_import import import_hf, plan_import

    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              expert_model_parallel_size=args.ep)
    launched = int(os.environ.get("WORLD_SIZE", "0")) or None
    nproc = launched or (args.tp * args.pp * args.ep if args.nproc is None else args.nproc)
    plan = plan_import(args.hf, args.out, parallel, args.precision, args.tokenizer, world_size=nproc)
    if launched is None and nproc > 1:
        from ..runtime.launch import relaunch_local

        return relaunch_local("convert", argv, nproc, prog="llada-cpt convert import")
    out = import_hf(plan)
    if int(os.environ.get("RANK", "0")) == 0:
        m = plan.model
        mask = f", mask id {plan.mask_id}" if plan.tokenizer else " (no tokenizer found: set data.tokenizer)"
        print(f"wrote {out}: {plan.arch.model_type}, {m.num_layers} layers, vocab {m.vocab_size}{mask}; "
              f"start training with train.init_from={out} and the model section of "
              f"{out}/iter_0000000/config.yaml", flush=True)
    return 0


def _export(args) -> int:
    from .hf_export import export_hf, plan_export
    from .safetensors_io import parse_size

    plan = plan_export(args.ckpt, args.out, args.hf_template, args.dtype, parse_size(args.max_shard_size))
    out = export_hf(plan)
    print(f"wrote {out}: HF {plan.arch.model_type}, vocab {plan.vocab_size}, {plan.out_dtype}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.direction is None:
        parser.print_help()
        return 2
    if args.direction == "import":
        return _import(args, argv)
    return _export(args)


if __name__ == "__main__":
    sys.exit(main())

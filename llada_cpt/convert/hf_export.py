"""Our Megatron checkpoint -> Hugging Face directory (``llada-cpt convert export``).

Runs in one process: the checkpoint (any TP/PP/EP layout; ``dist_checkpointing``
reshards it) is loaded into an unsplit model, whose parameters are converted one
by one into safetensors shards of at most ``max_shard_bytes`` - peak memory is
the model once plus one shard.  The HF architecture comes from ``--hf-template``
(an HF model directory whose ``config.json`` keeps its other fields), else from
the ``hf_template/`` that ``convert import`` left in the run directory, else it is
inferred (MoE -> qwen3_moe, QK-norm -> qwen3, QKV bias -> qwen2, else llama).
Tokenizer files come from the checkpoint's ``data.tokenizer`` directory (mask
token included), else from the template directory.  The vocabulary is the
model's (``model.vocab_size``, i.e. with an added mask row), padding stripped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.info import CheckpointInfo
from ..checkpoint.paths import EMBEDDING_KEY
from ..config.schema import Config, ParallelConfig
from ..errors import partial_output
from .errors import ConvertError, ConvertInputMissing
from .hf_import import TEMPLATE_DIR, TOKENIZER_DIR, check_output_path, ensure_layout, publish_permissions
from .mapping import Architecture, canonical_name, hf_config_from_model, hf_tensor_names, model_slots, to_hf
from .safetensors_io import ShardedWriter, read_config
from .tokenizer_files import copy_tokenizer_files, find_tokenizer, inspect_tokenizer

__all__ = ["ExportPlan", "plan_export", "export_hf"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class ExportPlan:
    checkpoint: Path  # the iter_* directory
    out: Path
    config: Config
    arch: Architecture
    hf_config: dict
    vocab_size: int  # rows written (padding stripped)
    stored_rows: int  # padded rows in the checkpoint
    stored_dtype: torch.dtype
    out_dtype: torch.dtype
    tokenizer: Optional[Path]  # tokenizer.json / .model whose directory's tokenizer files are copied
    template_dir: Optional[Path]
    max_shard_bytes: int


def _export_tokenizer(cfg: Config, checkpoint: Path, template_dir: Optional[Path]) -> Optional[Path]:
    """The tokenizer file to ship: the checkpoint's ``data.tokenizer``, its run's ``tokenizer/``, the template's."""
    places = [checkpoint.parent / TOKENIZER_DIR, template_dir]
    if cfg.data.tokenizer:
        given = Path(cfg.data.tokenizer)
        if given.is_file():
            return given
        places.insert(0, given)
    found = (find_tokenizer(d) for d in places if d is not None and d.is_dir())
    return next((f for f in found if f is not None), None)


def plan_export(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    hf_template: Optional[str | os.PathLike] = None,
    dtype: str = "auto",
    max_shard_bytes: int = 5 * 10**9,
) -> ExportPlan:
    """Check an export (paths, config, architecture) before anything is built or written."""
    if dtype not in ("auto", *_DTYPES):
        raise ConvertError(f"--dtype `{dtype}` is not one of auto, {', '.join(_DTYPES)}")
    info = CheckpointInfo.read(ckpt)
    path = info.path
    if info.saved_config is None:
        raise ConvertInputMissing(f"`{path}` has no config.yaml; only checkpoints written by llada-cpt "
                                  "(train, convert import, merge) can be exported")
    cfg = info.config
    template_dir = Path(hf_template) if hf_template else path.parent / TEMPLATE_DIR
    if hf_template and not template_dir.is_dir():
        raise ConvertInputMissing(f"--hf-template `{template_dir}` is not a directory; pass a Hugging Face model "
                                  "directory (its config.json is used)")
    template = read_config(template_dir) if template_dir.is_dir() else None
    if hf_template and template is None:
        raise ConvertInputMissing(f"--hf-template `{template_dir}` has no config.json")
    if template is None:
        template_dir = None
    tok_file = _export_tokenizer(cfg, path, template_dir)
    tok = inspect_tokenizer(tok_file) if tok_file else None
    embedding = info.stored_embedding
    if embedding is None:
        raise ConvertError(f"`{path}` holds no `{EMBEDDING_KEY}`; it is not a complete model checkpoint")
    rows, stored = int(embedding.shape[0]), embedding.dtype
    vocab = cfg.model.vocab_size or (tok.vocab_size if tok else None)
    if vocab is None or vocab > rows:
        raise ConvertError(f"cannot tell the vocabulary size of `{path}` (model.vocab_size={cfg.model.vocab_size}, "
                           f"{rows} stored rows); set model.vocab_size in its config.yaml")
    out_dtype = stored if dtype == "auto" else _DTYPES[dtype]
    if out_dtype not in _DTYPE_NAMES:
        raise ConvertError(f"the checkpoint stores {stored}; pass --dtype fp32 or bf16")
    arch, hf_cfg = hf_config_from_model(cfg.model, vocab, template, _DTYPE_NAMES[out_dtype],
                                        eos_token_id=tok.eod_id if tok else None)
    inputs = [path.parent] + [p for p in (template_dir, tok_file.parent if tok_file else None) if p is not None]
    return ExportPlan(path, check_output_path(Path(out), inputs), cfg, arch, hf_cfg, vocab, rows, stored, out_dtype,
                      tok_file, template_dir, max_shard_bytes)


def export_hf(plan: ExportPlan, seed: int = 1234) -> Path:
    """Write the HF directory (one process; Megatron is initialised as a world of one)."""
    import torch.distributed as dist

    from ..checkpoint.megatron import load_checkpoint
    from ..model.provider import build_model

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_initialized() and dist.get_world_size() > 1):
        raise ConvertError("convert export runs in one process; launch it without --nproc / torchrun")
    ensure_layout(ParallelConfig(), seed=seed)
    # the stored padding follows the TP size that saved it: build exactly that many rows
    model_cfg = dataclasses.replace(plan.config.model, make_vocab_size_divisible_by=plan.stored_rows)
    precision = "bf16" if plan.stored_dtype == torch.bfloat16 else "fp32"
    (model,) = build_model(model_cfg, ParallelConfig(), precision, plan.vocab_size)
    load_checkpoint(plan.checkpoint, [model], restore_rng=False)
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{plan.out.name}.tmp-", dir=plan.out.parent))
    with partial_output(tmp, plan.out, f"writing the Hugging Face model in {plan.out.parent}", "the export"):
        _write_weights(model, plan, tmp)
        (tmp / "config.json").write_text(json.dumps(plan.hf_config, indent=2, sort_keys=True) + "\n")
        if plan.template_dir is not None and (plan.template_dir / "generation_config.json").is_file():
            shutil.copy2(plan.template_dir / "generation_config.json", tmp / "generation_config.json")
        if plan.tokenizer is not None:
            copy_tokenizer_files(plan.tokenizer.parent, tmp)
            standard = tmp / ("tokenizer.json" if plan.tokenizer.suffix == ".json" else "tokenizer.model")
            if not standard.exists():  # e.g. a run's own `demo.model`: transformers looks for the standard name
                shutil.copy2(plan.tokenizer, standard)
        if plan.out.exists():
            raise ConvertError(f"output `{plan.out}` appeared during the export; nothing was overwritten")
        publish_permissions(tmp)
        os.replace(tmp, plan.out)
    return plan.out


def _write_weights(model, plan: ExportPlan, directory: Path) -> None:
    m = plan.config.model
    slots = model_slots(plan.arch, m)
    writer = ShardedWriter(directory, plan.max_shard_bytes)
    written = set()
    for name, param in model.named_parameters():
        canonical = canonical_name(name)
        if canonical not in slots:
            raise ConvertError(f"Megatron parameter `{name}` has no counterpart in HF {plan.arch.model_type}")
        for hf_name, tensor in to_hf(slots[canonical], param.detach(), m, plan.vocab_size).items():
            if hf_name not in written:  # tied: the output layer is the embedding
                writer.add(hf_name, tensor.to(plan.out_dtype))
                written.add(hf_name)
    missing = [n for n in hf_tensor_names(slots) if n not in written]
    if missing:
        raise ConvertError(f"the checkpoint's model lacks {', '.join(missing[:3])}; it does not match its config.yaml")
    writer.close()

"""Hugging Face -> our Megatron checkpoint (``llada-cpt convert import``).

:func:`plan_import` checks everything that can be checked without Megatron
(input files, architecture, tensor names, tokenizer, output path, parallel
sizes) so a bad input fails at once with one message and writes nothing.
:func:`import_hf` is collective: every rank builds our ``GPTModel`` with the
target TP/PP/EP layout, fills *its own* parameters from the safetensors files
(one HF tensor at a time, only the vocabulary rows it holds), and the ranks
save together with :func:`llada_cpt.checkpoint.megatron.save_checkpoint`.

Output ``OUT`` is a run directory, written as a hidden sibling and renamed when
complete (an existing ``OUT`` is never touched)::

    OUT/iter_0000000/     torch_dist checkpoint + config.yaml (model, parallel, diffusion.mask_id,
                          data.tokenizer) + metrics.json (source, architecture)
    OUT/latest
    OUT/tokenizer/        the tokenizer files, mask token added when missing
    OUT/hf_template/      the source config.json (+ generation_config.json), used by export

so ``train.init_from=OUT``, generation and ``convert export`` load it.

Mask token: a tokenizer without one gets ``[MASK]`` after its last id; when that
id is past the HF embedding, the embedding (and untied output layer) grow by
one row, initialised to **zero**.  The LLaDA2.0 report (section on numerical
stability) observes that mask-token embeddings of AR models are ~0 anyway (never
observed, decayed) and rejects random re-initialisation; it stabilises CPT by
adding Gaussian noise to the masked embedding *output* instead (our
``diffusion.embedding_noise_std``/``embedding_noise_steps``), which is what to
enable when training from a converted model.  Megatron's vocabulary padding
rows are zero as well; logits of the original ids are unchanged.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from ..config.choices import field_choices
from ..config.schema import Config, DataConfig, DiffusionConfig, ModelConfig, ParallelConfig, TrainConfig
from ..errors import partial_output
from .errors import ConvertError
from .mapping import (
    Architecture,
    canonical_name,
    hf_tensor_names,
    is_expert_param,
    model_config_from_hf,
    model_slots,
    to_megatron,
    tp_shard,
)
from .safetensors_io import HFCheckpoint
from .tokenizer_files import TokenizerInfo, find_tokenizer, inspect_tokenizer, write_tokenizer

__all__ = ["ImportPlan", "plan_import", "import_hf", "ensure_layout", "fill_model", "check_output_path",
           "publish_permissions", "TEMPLATE_DIR", "TOKENIZER_DIR"]

TOKENIZER_DIR = "tokenizer"
TEMPLATE_DIR = "hf_template"
_TEMPLATE_FILES = ("config.json", "generation_config.json")
_IGNORED_HF = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved


@dataclass(frozen=True)
class ImportPlan:
    """A checked conversion: what is read, what is built, where it goes."""

    hf_dir: Path
    out: Path
    arch: Architecture
    model: ModelConfig  # vocab_size: HF rows, plus the added mask row when there is one
    hf_vocab: int
    parallel: ParallelConfig
    precision: str
    tokenizer: Optional[TokenizerInfo]

    @property
    def mask_id(self) -> Optional[int]:
        return self.tokenizer.mask_id if self.tokenizer else None

    def config(self) -> Config:
        """The config saved with the checkpoint (``config.yaml``)."""
        tok = str(self.out / TOKENIZER_DIR / self.tokenizer.path.name) if self.tokenizer else None
        return Config(model=self.model, parallel=self.parallel, diffusion=DiffusionConfig(mask_id=self.mask_id),
                      data=DataConfig(tokenizer=tok), train=TrainConfig(precision=self.precision))


def check_output_path(out: Path, inputs: List[Path]) -> Path:
    """``out`` resolved; it must not exist and must not lie inside an input."""
    out = Path(os.path.abspath(out))
    if out.exists():
        raise ConvertError(f"output `{out}` already exists; conversion never overwrites: pass a new path")
    for src in inputs:
        src = Path(os.path.abspath(src))
        if out == src or src in out.parents:
            raise ConvertError(f"output `{out}` lies inside the input `{src}`; write the conversion elsewhere")
    return out


def _check_layout(m: ModelConfig, p: ParallelConfig, world_size: Optional[int]) -> None:
    from ..training.distributed import check_world_size

    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    groups = m.num_query_groups or m.num_attention_heads
    problems = []
    if m.num_attention_heads % tp or groups % tp:
        problems.append(f"--tp {tp} must divide the heads ({m.num_attention_heads}) and kv heads ({groups})")
    if m.num_layers % pp:
        problems.append(f"--pp {pp} must divide the number of layers ({m.num_layers})")
    if ep > 1 and (not m.num_experts or m.num_experts % ep):
        problems.append(f"--ep {ep} must divide the number of experts ({m.num_experts or 'dense model'})")
    if problems:
        raise ConvertError("; ".join(problems))
    if world_size is not None:
        check_world_size(p, world_size)


def _check_tensor_names(ckpt: HFCheckpoint, expected: List[str], tied: bool) -> None:
    have = set(ckpt.names())
    missing = [n for n in expected if n not in have]
    optional = {"lm_head.weight"} if tied else set()  # some tied checkpoints store the head as well
    extra = sorted(n for n in have - set(expected) - optional if not n.endswith(_IGNORED_HF))
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if extra:
            what.append(f"{len(extra)} tensors the conversion does not know (e.g. {', '.join(extra[:3])})")
        raise ConvertError(f"the weights in `{ckpt.path}` do not match its config.json: {'; '.join(what)}; "
                           "the checkpoint is incomplete or uses an unsupported variant")


def plan_import(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    parallel: Optional[ParallelConfig] = None,
    precision: str = "auto",
    tokenizer: Optional[str | os.PathLike] = None,
    world_size: Optional[int] = None,
) -> ImportPlan:
    """Check a conversion without touching Megatron or the disk; raises one clear error per problem."""
    precisions = field_choices(TrainConfig, "precision")
    if precision not in precisions:
        raise ConvertError(f"--precision `{precision}` is not one of {', '.join(precisions)}")
    ckpt = HFCheckpoint(hf_dir)
    arch, model = model_config_from_hf(ckpt.config)
    _check_tensor_names(ckpt, hf_tensor_names(model_slots(arch, model)),
                        tied=not model.untie_embeddings_and_output_weights)
    hf_vocab = int(model.vocab_size)
    rows = ckpt.shape("model.embed_tokens.weight")[0]
    if rows != hf_vocab:
        raise ConvertError(f"model.embed_tokens.weight has {rows} rows but config.json says vocab_size={hf_vocab}")
    tok_path = Path(tokenizer) if tokenizer else find_tokenizer(ckpt.path)
    info = inspect_tokenizer(tok_path) if tok_path else None
    vocab = hf_vocab
    if info is not None:
        own = info.vocab_size - int(info.mask_added)
        if own > hf_vocab:
            raise ConvertError(f"the tokenizer {info.path} has {own} tokens but the model only {hf_vocab} embedding "
                               "rows; pass the model's own tokenizer with --tokenizer")
        vocab = max(hf_vocab, info.mask_id + 1)
    model = dataclasses.replace(model, vocab_size=vocab)
    parallel = parallel or ParallelConfig()
    _check_layout(model, parallel, world_size)
    inputs = [ckpt.path] + ([info.path.parent] if info else [])
    return ImportPlan(Path(os.path.abspath(ckpt.path)), check_output_path(Path(out), inputs), arch, model, hf_vocab,
                      parallel, precision, info)


# ----------------------------------------------------------------------------- collective part


def _vocab_rows(ckpt: HFCheckpoint, name: str, hf_vocab: int, local_rows: int, rank: int) -> torch.Tensor:
    """This rank's rows of the padded vocabulary: HF rows, then zero rows (new mask row, padding)."""
    start = rank * local_rows
    stop = min(start + local_rows, hf_vocab)
    ours = ckpt.read_rows(name, start, stop) if stop > start else None
    width = ckpt.shape(name)[1]
    out = torch.zeros(local_rows, width, dtype=ours.dtype if ours is not None else torch.float32)
    if ours is not None:
        out[: stop - start] = ours
    return out


def fill_model(chunks: list, ckpt: HFCheckpoint, plan: ImportPlan) -> int:
    """Copy the HF tensors into this rank's parameters (sliced for TP/EP); returns the count filled."""
    from megatron.core import parallel_state as ps

    from ..model.wrappers import unwrap

    m = plan.model
    slots = model_slots(plan.arch, m)
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    ep = plan.parallel.expert_model_parallel_size
    expert_offset = ps.get_expert_model_parallel_rank() * (m.num_experts or 0) // ep
    filled = 0
    for chunk in chunks:
        chunk = unwrap(chunk)
        layers = chunk.decoder.layers
        layer_offset = layers[0].layer_number - 1 if len(layers) else 0
        for name, param in chunk.named_parameters():
            canonical = canonical_name(name, layer_offset, expert_offset)
            slot = slots.get(canonical)
            if slot is None:
                raise ConvertError(f"Megatron parameter `{name}` has no Hugging Face counterpart in a "
                                   f"{plan.arch.model_type} model; this model spec is not supported by the conversion")
            rank, size = etp if is_expert_param(canonical) else tp
            if not getattr(param, "tensor_model_parallel", False):
                rank, size = 0, 1
            if slot.kind == "vocab":
                local = _vocab_rows(ckpt, slot.hf[0], plan.hf_vocab, param.shape[0], rank)
            else:
                full = to_megatron(slot, [ckpt.read(n) for n in slot.hf], m)
                local = tp_shard(full, slot.kind, getattr(param, "partition_dim", 0), rank, size)
            if tuple(local.shape) != tuple(param.shape):
                raise ConvertError(f"{', '.join(slot.hf)} give a {tuple(local.shape)} tensor for `{name}`, which is "
                                   f"{tuple(param.shape)}; config.json does not match the weights")
            with torch.no_grad():
                param.copy_(local)
            filled += 1
    return filled


def publish_permissions(root: Path) -> None:
    """Give a finished output the umask's default modes (``mkdtemp`` makes 0700, safetensors 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _make_tmp_dir(out: Path):
    """Hidden sibling of ``out`` (same file system, so the final rename is atomic), agreed by all ranks."""
    import torch.distributed as dist

    name = None
    if dist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        name = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    box = [name]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def ensure_layout(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Initialise Megatron's parallel state for ``parallel`` unless it already has exactly these sizes.

    Conversion overwrites every parameter, so the RNG seeding of a fresh
    initialisation does not matter; skipping it saves rebuilding all process groups.
    """
    from megatron.core import parallel_state as ps

    from ..training.distributed import initialize

    p = parallel
    want = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
            p.expert_model_parallel_size)
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_context_parallel_world_size(), ps.get_expert_model_parallel_world_size())
        if have == want:
            return
    initialize(parallel, seed=seed)


def import_hf(plan: ImportPlan, seed: int = 1234) -> Path:
    """Collective: convert on every rank of the launch (sizes from ``plan.parallel``); returns ``plan.out``."""
    import torch.distributed as dist

    from ..checkpoint.megatron import save_checkpoint
    from ..model.provider import build_model

    ensure_layout(plan.parallel, seed=seed)
    rank = dist.get_rank()
    tmp = _make_tmp_dir(plan.out)
    # any rank removes the partial output: one that failed alone may be the only one left
    with partial_output(tmp, plan.out, f"writing the converted checkpoint in {plan.out.parent}", "the conversion"):
        if rank == 0:
            if plan.tokenizer is not None:
                write_tokenizer(plan.tokenizer, tmp / TOKENIZER_DIR)
            (tmp / TEMPLATE_DIR).mkdir()
            for name in _TEMPLATE_FILES:
                if (plan.hf_dir / name).is_file():
                    shutil.copy2(plan.hf_dir / name, tmp / TEMPLATE_DIR / name)
        chunks = build_model(plan.model, plan.parallel, plan.precision, plan.model.vocab_size)
        fill_model(chunks, HFCheckpoint(plan.hf_dir), plan)
        state = {"iteration": 0, "consumed_tokens": 0, "consumed_samples": 0}
        metrics = {"converted_from": str(plan.hf_dir), "architecture": plan.arch.model_type,
                   "hf_vocab_size": plan.hf_vocab, "vocab_size": plan.model.vocab_size}
        save_checkpoint(tmp, 0, chunks, None, None, state, plan.config(), metrics)
        if rank == 0:
            if plan.out.exists():
                raise ConvertError(f"output `{plan.out}` appeared during the conversion; nothing was overwritten")
            publish_permissions(tmp)
            os.replace(tmp, plan.out)
        dist.barrier()
    return plan.out


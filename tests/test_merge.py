"""Top-k checkpoint merge (``llada-cpt merge``) on real Megatron torch_dist checkpoints.

The input run is written once per module by two spawned gloo ranks through the
training code's ``save_checkpoint`` (``dist_checkpointing.save``): a stand-in
model whose tensors are split over the two ranks the way TP splits them (each
layer of ``linear_qkv`` and the whole ``output_layer`` are stored as 2 shards),
plus replicated bf16 / int tensors, ``_extra_state``-like objects and optimizer
state.  In the same spawn rank 0 merges the top 3 (a process group is up, which
the merge must ignore) and both ranks load the result with ``load_checkpoint``
and with ``dist_checkpointing.load`` in another layout.  All other merges run in
the pytest process: the merge needs no process group.
"""
from __future__ import annotations

import json
import os
import shutil
import traceback
from pathlib import Path

import pytest
import torch
import yaml

from dist import run_distributed
from llada_cpt.checkpoint import io as checkpoint_io
from llada_cpt.checkpoint import merge
from llada_cpt.checkpoint import raw as checkpoint_raw
from llada_cpt.checkpoint.io import Region, TensorInfo, TorchDistCheckpoint
from llada_cpt.checkpoint.paths import resolve_checkpoint
from llada_cpt.checkpoint.writer import write_torch_dist
from llada_cpt.cli import main as cli_main

# iteration -> val_ppl (None: metrics.json without it)
RUN = {100: 5.0, 200: 3.0, 300: None, 400: 4.0, 500: 3.5}
TOP3 = [200, 500, 400]
LAYERS, ROWS, COLS, VOCAB = 2, 8, 6, 10
QKV, EMB, OUT_W, NORM, IDS = ("decoder.layers.self_attention.linear_qkv.weight", "embedding.word_embeddings.weight",
                             "output_layer.weight", "decoder.final_layernorm.weight", "embedding.position_ids")
OBJ = "decoder.layers.self_attention.linear_qkv._extra_state"
EXP_AVG = "optimizer.state.exp_avg.output_layer.weight"


def global_tensors(seed: int) -> dict:
    """The global tensors of fixture checkpoint ``seed`` (what any layout must reassemble)."""
    g = torch.Generator().manual_seed(seed)
    return {
        QKV: torch.randn(LAYERS, ROWS, COLS, generator=g),
        EMB: torch.randn(VOCAB, COLS, generator=g).to(torch.bfloat16),
        OUT_W: torch.randn(VOCAB, COLS, generator=g),
        NORM: torch.randn(COLS, generator=g),
        IDS: torch.arange(5) + seed,  # integer: copied from the first input, never averaged
    }


def expected_mean(seeds, weights) -> dict:
    """The weighted mean computed in memory, in fp32, cast back to each stored dtype."""
    total = sum(weights)
    tensors = [global_tensors(s) for s in seeds]
    out = {}
    for key, ref in tensors[0].items():
        if ref.dtype.is_floating_point:
            out[key] = sum(t[key].float() * (w / total) for t, w in zip(tensors, weights)).to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out


# ----------------------------------------------------------------------------- spawned ranks


def _sharded(tensors: dict, rank: int, world: int) -> dict:
    """Megatron ShardedTensors of this rank: qkv rows and output_layer split over ranks like TP."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    rows, vocab = ROWS // world, VOCAB // world
    sd = {}
    for layer in range(LAYERS):
        local = tensors[QKV][layer, rank * rows:(rank + 1) * rows].clone()
        sd[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"] = ShardedTensor.from_rank_offsets(
            QKV, local, (0, layer, LAYERS), (1, rank, world), replica_id=0, prepend_axis_num=1)
        sd[f"decoder.layers.{layer}.self_attention.linear_qkv._extra_state"] = ShardedObject(
            OBJ, {"layer": layer, "fp8": None}, (LAYERS,), (layer,), replica_id=rank)
    sd[OUT_W] = ShardedTensor.from_rank_offsets(
        OUT_W, tensors[OUT_W][rank * vocab:(rank + 1) * vocab].clone(), (0, rank, world), replica_id=0)
    for key in (EMB, NORM, IDS):
        sd[key] = ShardedTensor.from_rank_offsets(key, tensors[key].clone(), replica_id=rank)
    return sd


class _StandIn(torch.nn.Module):
    """Just enough of a GPTModel for ``save_checkpoint`` / ``load_checkpoint``."""

    def __init__(self, tensors: dict, rank: int, world: int):
        super().__init__()
        self.sd = _sharded(tensors, rank, world)
        self.loaded = None

    def sharded_state_dict(self):
        return self.sd

    def load_state_dict(self, state_dict, strict=True):
        self.loaded = state_dict


class _StandInOptimizer:
    def __init__(self, tensors: dict, rank: int, world: int):
        from megatron.core.dist_checkpointing import ShardedTensor

        vocab = VOCAB // world
        self.sd = {"state": ShardedTensor.from_rank_offsets(
            EXP_AVG, torch.full((vocab, COLS), 7.0), (0, rank, world), replica_id=0),
            "param_groups": [{"lr": 1e-3}]}

    def sharded_state_dict(self, model_sd, is_loading=False, metadata=None):
        return self.sd


def _session(rank: int, world: int, root: str) -> dict:
    """Write the input run; rank 0 merges its top 3 (with a process group up); both ranks load the result."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from llada_cpt.checkpoint.megatron import load_checkpoint, save_checkpoint
    from llada_cpt.config.schema import Config
    from llada_cpt.megatron_patches import cpu as megatron_cpu

    megatron_cpu.apply()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # every merge of this process cuts stored chunks over 64 bytes into row runs: Megatron's
    # loader must reassemble the merged tensors from that chunking (qkv layers: 2 rows per piece)
    merge.MAX_REGION_BYTES = 64
    for it, ppl in RUN.items():
        t = global_tensors(it)
        save_checkpoint(f"{root}/run", it, [_StandIn(t, rank, world)], _StandInOptimizer(t, rank, world), None,
                        {"iteration": it}, Config(), None if ppl is None else {"val_ppl": ppl})
    out = f"{root}/loaded"
    if rank == 0:
        assert merge.main(["--run-dir", f"{root}/run", "--top-k", "3", "--out", out, "--no-progress"]) == 0
    dist.barrier()
    path = resolve_checkpoint(out)
    model = _StandIn({k: torch.zeros_like(v) for k, v in global_tensors(0).items()}, rank, world)
    state = load_checkpoint(path, [model], optimizer=None, restore_rng=False)
    # another layout: rank r reads layer r of qkv whole, and column half r of output_layer
    other = {
        "qkv": ShardedTensor.from_rank_offsets(QKV, torch.zeros(ROWS, COLS), (0, rank, LAYERS), replica_id=0,
                                               prepend_axis_num=1),
        "out": ShardedTensor.from_rank_offsets(OUT_W, torch.zeros(VOCAB, COLS // world), (1, rank, world),
                                               replica_id=0),
    }
    loaded = dist_checkpointing.load(other, str(path))
    meta = dist_checkpointing.load_tensors_metadata(str(path))
    try:
        gpt = _merge_real_gpt_tp2(rank, f"{root}/gpt")
    except Exception:  # reported by its own test, so the stand-in tests still run
        gpt = traceback.format_exc()
    return {"state": state, "same_split": model.loaded, "qkv_layer": loaded["qkv"], "out_cols": loaded["out"],
            "meta_keys": sorted(meta), "gpt": gpt}


def _merge_real_gpt_tp2(rank: int, root: str) -> dict:
    """A real TP=2 GPTModel: 3 saves, merge, load back; per-parameter max |error| vs the local mean."""
    import torch.distributed as dist

    from llada_cpt.checkpoint.megatron import load_checkpoint, save_checkpoint
    from llada_cpt.config.schema import Config
    from llada_cpt.model.provider import build_model
    from llada_cpt.training.distributed import initialize

    cfg = Config()
    cfg.parallel.tensor_model_parallel_size = 2
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 32, 4
    cfg.model.ffn_hidden_size = 48
    initialize(cfg.parallel, seed=1)
    (model,) = build_model(cfg.model, cfg.parallel, "fp32", vocab_size=50)
    saved = []
    for i in range(3):
        with torch.no_grad():
            for j, p in enumerate(model.parameters()):  # TP-split params differ per rank, replicated ones do not
                split = getattr(p, "tensor_model_parallel", False)
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(
                    1000 * i + 10 * j + (rank if split else 0))))
        saved.append({k: v.clone() for k, v in model.state_dict().items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point()})
        save_checkpoint(f"{root}/run", 100 * (i + 1), [model], None, None, {}, cfg, {"val_ppl": 3.0 - i})
    if rank == 0:
        assert merge.main(["--run-dir", f"{root}/run", "--top-k", "3", "--out", f"{root}/m", "--no-progress"]) == 0
    dist.barrier()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_checkpoint(resolve_checkpoint(f"{root}/m"), [model], restore_rng=False)
    got = model.state_dict()
    return {k: (got[k] - sum(s[k] for s in saved) / 3).abs().max().item() for k in saved[0]}


# ----------------------------------------------------------------------------- fixtures and helpers


def ckpt_dir(root: Path, it: int) -> Path:
    return root / "run" / f"iter_{it:07d}"


def _copy_with(src: Path, dst: Path, change) -> None:
    """A copy of checkpoint ``src`` (one chunk per tensor) written after ``change(global tensors)``."""
    ck = TorchDistCheckpoint(src)
    tensors = change({k: ck.read_tensor(k) for k in ck.tensors})
    dst.mkdir(parents=True)
    outs = [TensorInfo(k, tuple(v.shape), v.dtype, (Region((0,) * v.dim(), tuple(v.shape)),))
            for k, v in tensors.items()]
    write_torch_dist(dst, outs, lambda t, r: tensors[t.key], {k: ck.read_object(k) for k in ck.objects})
    shutil.copyfile(src / "config.yaml", dst / "config.yaml")


def _write_variants(root: Path) -> None:
    """Copies of iter 100 that differ in one way each (shape, dtype, tensor set, architecture)."""
    src = ckpt_dir(root, 100)
    _copy_with(src, root / "shape", lambda t: {**t, OUT_W: torch.zeros(VOCAB + 2, COLS)})
    _copy_with(src, root / "dtype", lambda t: {**t, EMB: t[EMB].float()})
    _copy_with(src, root / "keys", lambda t: {**t, "decoder.extra.weight": torch.zeros(3)})
    _copy_with(src, root / "arch", lambda t: t)
    cfg = yaml.safe_load((root / "arch" / "config.yaml").read_text())
    cfg["model"]["hidden_size"] *= 2
    (root / "arch" / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("merge")
    ranks = run_distributed(_session, 2, str(path))
    _write_variants(path)
    return path, ranks


@pytest.fixture
def root(session) -> Path:
    return session[0]


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.bfloat16:  # fp32 sums in another order may round to the neighbouring bf16
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-6)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def run_cli(*args) -> int:
    return merge.main([*map(str, args), "--no-progress"])


# ----------------------------------------------------------------------------- tests


def test_fixture_stores_tensors_as_two_shards(root):
    """Guards the sharding tests below: the inputs really hold qkv / output_layer in TP pieces."""
    src = TorchDistCheckpoint(ckpt_dir(root, 100))
    assert len(src.tensors[OUT_W].chunks) == 2
    assert len(src.tensors[QKV].chunks) == LAYERS * 2
    assert EXP_AVG in src.tensors
    torch.testing.assert_close(src.read_tensor(QKV), global_tensors(100)[QKV])


def test_top_k_selection_min_and_max(root):
    sel = merge.select_top_k(root / "run", 3)
    assert [c.iteration for c in sel.chosen] == TOP3
    assert sel.weights == pytest.approx([1 / 3] * 3)
    assert [(c.iteration, "val_ppl" in why) for c, why in sel.skipped] == [(300, True)]
    assert [c.iteration for c in merge.select_top_k(root / "run", 2, mode="max").chosen] == [100, 400]
    assert [c.iteration for c in merge.select_top_k(root / "run", 1, metric="iteration", mode="max").chosen] == [500]


def test_too_few_scored_checkpoints_and_missing_run(root, tmp_path):
    with pytest.raises(merge.CheckpointError, match=r"4 checkpoint\(s\) with `val_ppl` but --top-k is 5"):
        merge.select_top_k(root / "run", 5)
    with pytest.raises(merge.CheckpointError, match="does not exist"):
        merge.select_top_k(tmp_path / "nope", 2)
    assert cli_main(["merge", "--run-dir", str(tmp_path / "nope"), "--top-k", "2", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_top_k_merge_equals_in_memory_mean(root, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run_cli("--run-dir", root / "run", "--top-k", 3, "--out", out, "--threads", 2) == 0  # regions ahead
    printed = capsys.readouterr().out
    assert "optimizer state is not merged" in printed
    assert "iter_0000200" in printed and "skipped iter_0000300" in printed
    assert (out / "latest").read_text().strip() == "iter_0000500"  # the newest input's iteration
    path = resolve_checkpoint(out)
    assert path == out / "iter_0000500"
    merged = TorchDistCheckpoint(path)
    expected = expected_mean(TOP3, [1, 1, 1])
    assert sorted(merged.tensors) == sorted(expected)  # model tensors only: no optimizer state
    for key, want in expected.items():
        assert_matches(merged.read_tensor(key), want)
    first = TorchDistCheckpoint(ckpt_dir(root, 200))
    assert merged.objects == first.objects and merged.objects
    assert all(merged.read_object(k) == first.read_object(k) for k in merged.objects)
    assert "optimizer" not in merged.common() and "state" not in merged.common()
    meta = json.loads((path / "metrics.json").read_text())
    assert [s["iteration"] for s in meta["merge"]["sources"]] == TOP3
    assert [s["val_ppl"] for s in meta["merge"]["sources"]] == [3.0, 3.5, 4.0]
    assert meta["merge"]["optimizer_merged"] is False and meta["merge"]["copied_tensors"] == [IDS]
    assert (path / "config.yaml").read_text() == (ckpt_dir(root, 200) / "config.yaml").read_text()
    assert not list(tmp_path.glob("merged.tmp-*"))


def test_weighted_merge_of_explicit_checkpoints(root, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_io, "_SLAB", 7)  # take the slab-wise bf16 -> fp32 path on these small tensors
    out = tmp_path / "weighted"
    assert run_cli("--ckpts", ckpt_dir(root, 100), ckpt_dir(root, 400), "--weights", 3, 1, "--out", out,
                   "--threads", 1) == 0
    merged = TorchDistCheckpoint(resolve_checkpoint(out))
    for key, want in expected_mean([100, 400], [3, 1]).items():
        assert_matches(merged.read_tensor(key), want)
    meta = json.loads((resolve_checkpoint(out) / "metrics.json").read_text())["merge"]
    assert meta["method"] == "weighted" and [s["weight"] for s in meta["sources"]] == [0.75, 0.25]


def test_inputs_in_different_layouts_merge(root, tmp_path):
    """A copy of iter 400 stored as whole tensors (one chunk each) merges with the 2-shard iter 200."""
    src = TorchDistCheckpoint(ckpt_dir(root, 400))
    whole = tmp_path / "whole" / "iter_0000400"
    whole.mkdir(parents=True)
    tensors = [TensorInfo(k, i.shape, i.dtype, (Region((0,) * len(i.shape), i.shape),))
               for k, i in src.tensors.items()]
    write_torch_dist(whole, tensors, lambda t, r: src.read_tensor(t.key),
                     {k: src.read_object(k) for k in src.objects})
    assert len(TorchDistCheckpoint(whole).tensors[OUT_W].chunks) == 1
    out = tmp_path / "mixed"
    assert run_cli("--ckpts", ckpt_dir(root, 200), whole, "--out", out) == 0
    merged = TorchDistCheckpoint(resolve_checkpoint(out))
    for key, want in expected_mean([200, 400], [1, 1]).items():
        assert_matches(merged.read_tensor(key), want)


@pytest.mark.parametrize("variant, named", [
    ("shape", f"`{OUT_W}`"), ("dtype", f"`{EMB}`"), ("keys", "`decoder.extra.weight`"), ("arch", "`model.hidden_size`"),
])
def test_mismatched_checkpoints_are_refused_naming_the_tensor(root, tmp_path, variant, named):
    out = tmp_path / "out"
    with pytest.raises(merge.MergeError, match=named):
        run_cli("--ckpts", ckpt_dir(root, 100), root / variant, "--out", out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_output_inside_an_input_is_refused(root):
    run = root / "run"
    before = sorted(p.name for p in run.iterdir())
    for out, args in [(run / "merged", ("--run-dir", run, "--top-k", 2)),
                      (ckpt_dir(root, 100) / "m", ("--ckpts", ckpt_dir(root, 100), ckpt_dir(root, 200))),
                      (run / "m", ("--ckpts", run, ckpt_dir(root, 100)))]:
        with pytest.raises(merge.MergeError, match="inside the input"):
            run_cli(*args, "--out", out)
    assert sorted(p.name for p in run.iterdir()) == before


def test_existing_output_is_refused(root, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(merge.MergeError, match="already exists"):
        run_cli("--run-dir", root / "run", "--top-k", 2, "--out", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("threads, error", [(1, KeyboardInterrupt), (2, KeyboardInterrupt), (2, OSError)])
def test_interrupted_merge_leaves_no_output(root, tmp_path, monkeypatch, threads, error):
    """Ctrl-C or a failure mid-write, also inside a DCP writer thread: no OUT, no OUT.tmp-<pid>."""
    calls = []
    real = merge._Averager.__call__

    def failing(self, tensor, region):
        calls.append(tensor.key)
        if len(calls) == 3:
            raise error("simulated failure")
        return real(self, tensor, region)

    monkeypatch.setattr(merge._Averager, "__call__", failing)
    out = tmp_path / "merged"
    with pytest.raises(error, match="simulated failure"):
        run_cli("--run-dir", root / "run", "--top-k", 3, "--out", out, "--threads", threads)
    assert len(calls) >= 3  # it did start writing
    assert list(tmp_path.iterdir()) == []


def test_dry_run_writes_nothing(root, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run_cli("--run-dir", root / "run", "--top-k", 2, "--out", out, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "iter_0000200" in printed and "iter_0000500" in printed
    assert list(tmp_path.iterdir()) == []


def test_bad_weights_and_arguments(root, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(merge.MergeError, match="2 weights for 3 checkpoints"):
        run_cli("--run-dir", root / "run", "--top-k", 3, "--weights", 1, 2, "--out", out)
    with pytest.raises(merge.MergeError, match=">= 0"):
        merge.normalise_weights([1, -1], 2)
    with pytest.raises(merge.MergeError, match="listed twice"):
        run_cli("--ckpts", ckpt_dir(root, 100), ckpt_dir(root, 100), "--out", out)
    with pytest.raises(merge.MergeError, match="--top-k"):
        run_cli("--run-dir", root / "run", "--out", out)
    assert not out.exists()


def test_merged_checkpoint_loads_with_dist_checkpointing(session):
    """Merged in a process with a gloo group, loaded by 2 ranks: the training loader and another split."""
    want = expected_mean(TOP3, [1, 1, 1])
    for rank, res in enumerate(session[1]):
        assert res["state"] == {}  # no loop state: the merge starts a new stage
        assert res["meta_keys"] == sorted(want)
        split = res["same_split"]
        for layer in range(LAYERS):
            assert_matches(split[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"],
                           want[QKV][layer, rank * 4:(rank + 1) * 4])
        assert_matches(split[OUT_W], want[OUT_W][rank * 5:(rank + 1) * 5])
        assert_matches(split[EMB], want[EMB])
        assert_matches(split[IDS], want[IDS])
        assert_matches(res["qkv_layer"], want[QKV][rank])
        assert_matches(res["out_cols"], want[OUT_W][:, rank * 3:(rank + 1) * 3])


def test_real_tp2_gpt_model_merges_and_loads(session):
    """Megatron's own GPTModel at TP=2 (per-layer, per-TP-rank and SwiGLU-split chunks, _extra_state)."""
    for res in session[1]:
        errors = res["gpt"]
        assert isinstance(errors, dict), errors  # a traceback string when the model path failed
        assert len(errors) > 5 and max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("shape, contiguous", [((3000, 700), True), ((700, 3000), False), ((5,), True)])
def test_add_scaled_matches_promoted_add(shape, contiguous):
    """bf16 into fp32 slab by slab (> 1M elements), the non-contiguous fallback, and small tensors."""
    g = torch.Generator().manual_seed(0)
    dest = torch.randn(shape, generator=g)
    src = torch.randn(shape, generator=g).to(torch.bfloat16)
    if not contiguous:
        dest, src = dest.t(), src.t()
    want = dest + 0.3 * src.float()
    checkpoint_io.add_scaled(dest, src, 0.3)
    torch.testing.assert_close(dest, want)


def test_accumulating_read_target_refuses_other_uses():
    """If a torch version's DCP reader used the target other than by copy_, the merge must fail, not mis-add."""
    target = checkpoint_io._AddInto(torch.zeros(4), 0.5)
    with pytest.raises(RuntimeError, match="update _AddInto"):
        target + 1
    with pytest.raises(RuntimeError, match="update _AddInto"):
        target.sum()


# ----------------------------------------------------------------------------- direct reads (checkpoint_raw)


@pytest.fixture
def direct_calls(monkeypatch) -> list:
    """One entry per region the merge sums through the direct read path."""
    calls = []
    real_sum = merge.weighted_sum
    monkeypatch.setattr(merge, "weighted_sum", lambda *a, **k: calls.append(1) or real_sum(*a, **k))
    return calls


def _all_outputs(path: Path) -> dict:
    ck = TorchDistCheckpoint(path)
    return {k: ck.read_tensor(k) for k in ck.tensors}


def test_direct_reads_equal_dcp_reads_and_refuse_strided_boxes(root):
    """Every stored chunk, a contiguous run inside one (rows), and a box that is not one run of bytes (columns)."""
    src = TorchDistCheckpoint(ckpt_dir(root, 200))
    checked = 0
    for key, info in src.tensors.items():
        for chunk in info.chunks:
            raw = src.raw_source(key, chunk)
            assert raw is not None, (key, chunk)
            got = torch.empty(chunk.sizes, dtype=info.dtype)
            checkpoint_raw.read_exact(raw.fd, got, raw.offset)
            want = torch.empty(chunk.sizes, dtype=info.dtype)
            src.read_region(key, chunk, want)
            assert torch.equal(got, want), key
            checked += 1
    assert checked > len(src.tensors)  # the sharded tensors' pieces too
    whole = global_tensors(200)[EMB]
    rows = Region((3, 0), (4, COLS))  # rows 3..6 of the single embedding chunk: one run of bytes
    raw = src.raw_source(EMB, rows)
    got = torch.empty(rows.sizes, dtype=torch.bfloat16)
    checkpoint_raw.read_exact(raw.fd, got, raw.offset)
    assert torch.equal(got, whole[3:7])
    assert src.raw_source(EMB, Region((0, 2), (VOCAB, 2))) is None  # a column band: strided
    assert src.raw_source(OUT_W, Region((0, 0), (VOCAB, COLS))) is None  # spans the two stored shards
    src.close()


def test_stored_layout_of_plain_strided_and_non_tensor_records(tmp_path):
    """torch.save records embedded at an offset of a bigger file, as DCP stores them (CRC on and off)."""
    import io as _io

    def record(obj, crc: bool) -> bytes:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(crc)
        try:
            buf = _io.BytesIO()
            torch.save(obj, buf)
            return buf.getvalue()
        finally:
            torch.serialization.set_crc32_options(before)

    t = torch.arange(24, dtype=torch.float32).view(4, 6)
    cases = [(t, True), (t[1:], False), (t.bfloat16(), False), (t.t(), True), ({"a": 1}, True)]
    blob, spans = b"x" * 13, []
    for obj, crc in cases:
        data = record(obj, crc)
        spans.append((len(blob), len(data)))
        blob += data
    path = tmp_path / "items.bin"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    try:
        layouts = [checkpoint_raw.stored_layout(fd, start, n) for start, n in spans]
        for (obj, _), layout in zip(cases[:3], layouts[:3]):
            got = torch.empty(obj.shape, dtype=obj.dtype)
            checkpoint_raw.read_exact(fd, got, layout.offset)
            assert layout.shape == tuple(obj.shape) and torch.equal(got, obj)
        assert layouts[3] is None  # a transposed view is saved with its strides: not one run of bytes
        assert layouts[4] is None  # not a tensor
    finally:
        os.close(fd)


def test_direct_path_is_used_and_equals_the_dcp_path_bitwise(root, tmp_path, monkeypatch, direct_calls):
    """Small slabs and 3 workers (stripes and slab edges inside the tiny tensors) vs reads through DCP only."""
    calls = direct_calls
    monkeypatch.setattr(checkpoint_raw, "SLAB_ELEMENTS", 7)
    direct = tmp_path / "direct"
    assert run_cli("--run-dir", root / "run", "--top-k", 3, "--out", direct, "--threads", 3) == 0
    floats = sum(len(i.chunks) for k, i in TorchDistCheckpoint(ckpt_dir(root, 200)).tensors.items()
                 if i.dtype.is_floating_point and not k.startswith("optimizer."))
    assert len(calls) == floats
    monkeypatch.setattr(TorchDistCheckpoint, "raw_source", lambda self, key, region: None)
    via_dcp = tmp_path / "via_dcp"
    assert run_cli("--run-dir", root / "run", "--top-k", 3, "--out", via_dcp, "--threads", 1) == 0
    assert len(calls) == floats  # no direct read the second time
    a, b = _all_outputs(resolve_checkpoint(direct)), _all_outputs(resolve_checkpoint(via_dcp))
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key, want in expected_mean(TOP3, [1, 1, 1]).items():
        assert_matches(a[key], want)


def test_merged_checkpoint_merges_again_through_the_direct_path(root, tmp_path, monkeypatch):
    """The merge writes records without CRC-32: reading them back directly must still work."""
    first = tmp_path / "first"
    assert run_cli("--ckpts", ckpt_dir(root, 200), ckpt_dir(root, 500), "--out", first) == 0
    src = TorchDistCheckpoint(resolve_checkpoint(first))
    assert all(src.raw_source(k, c) is not None for k, i in src.tensors.items() for c in i.chunks)
    again = tmp_path / "again"
    assert run_cli("--ckpts", first, ckpt_dir(root, 400), "--weights", 2, 1, "--out", again) == 0
    merged = _all_outputs(resolve_checkpoint(again))
    half, third = expected_mean([200, 500], [1, 1]), global_tensors(400)
    for key, ref in half.items():  # the first merge's output is rounded to its dtype (bf16) before the second
        want = (ref.float() * (2 / 3) + third[key].float() * (1 / 3)).to(ref.dtype) if ref.is_floating_point() else ref
        assert_matches(merged[key], want)


def test_regions_asked_out_of_order_are_still_right(root):
    """The averager computes the next region ahead; asked in another order it must not hand out a stale one."""
    from tqdm import tqdm

    plan = merge.plan_merge([ckpt_dir(root, it) for it in TOP3])
    averager = merge._Averager(plan, [1 / 3] * 3, tqdm(disable=True), threads=2)
    want = expected_mean(TOP3, [1, 1, 1])
    try:
        for tensor, region in reversed(averager.order):
            got = averager(tensor, region).clone()
            box = tuple(slice(o, o + n) for o, n in zip(region.offsets, region.sizes))
            assert_matches(got, want[tensor.key][box])
    finally:
        averager.close()


def test_split_regions_cuts_big_chunks_into_contiguous_row_runs():
    chunks = (Region((0, 0, 0), (1, 8, 6)), Region((0, 8, 0), (1, 8, 6)), Region((0,), (3,)))
    pieces = merge.split_regions(chunks, 4, max_bytes=4 * 6 * 3)  # 3 rows of 6 fp32 per piece
    assert pieces[:3] == (Region((0, 0, 0), (1, 3, 6)), Region((0, 3, 0), (1, 3, 6)), Region((0, 6, 0), (1, 2, 6)))
    assert len(pieces) == 7 and pieces[-1] == Region((0,), (3,))
    assert sum(p.numel for p in pieces) == sum(c.numel for c in chunks)
    assert merge.split_regions(chunks, 4, max_bytes=10)[0] == Region((0, 0, 0), (1, 1, 6))  # one row stays whole


def test_big_chunks_are_merged_in_pieces_through_the_direct_path(root, tmp_path, monkeypatch, direct_calls):
    """Output regions smaller than the stored chunks: still read directly, same values, more stored chunks."""
    calls = direct_calls
    monkeypatch.setattr(merge, "MAX_REGION_BYTES", 24)
    out = tmp_path / "pieces"
    assert run_cli("--run-dir", root / "run", "--top-k", 3, "--out", out) == 0
    merged = TorchDistCheckpoint(resolve_checkpoint(out))
    first = TorchDistCheckpoint(ckpt_dir(root, 200))
    assert len(merged.tensors[OUT_W].chunks) > len(first.tensors[OUT_W].chunks)
    floats = sum(len(merged.tensors[k].chunks) for k in merged.tensors if merged.tensors[k].dtype.is_floating_point)
    assert len(calls) == floats
    for key, want in expected_mean(TOP3, [1, 1, 1]).items():
        assert_matches(merged.read_tensor(key), want)


def test_big_chunks_stay_whole_when_the_inputs_are_chunked_differently(root, tmp_path, monkeypatch):
    """A piece of a chunk read through DCP would deserialise the other input's whole chunk again: no cutting."""
    src = TorchDistCheckpoint(ckpt_dir(root, 400))
    whole = tmp_path / "whole" / "iter_0000400"
    whole.mkdir(parents=True)
    write_torch_dist(whole, [TensorInfo(k, i.shape, i.dtype, (Region((0,) * len(i.shape), i.shape),))
                             for k, i in src.tensors.items()], lambda t, r: src.read_tensor(t.key),
                     {k: src.read_object(k) for k in src.objects})
    monkeypatch.setattr(merge, "MAX_REGION_BYTES", 24)
    plan = merge.plan_merge([ckpt_dir(root, 200), whole])
    regions = {t.key: t.chunks for t in plan.tensors}
    assert regions[OUT_W] == TorchDistCheckpoint(ckpt_dir(root, 200)).tensors[OUT_W].chunks  # 2 shards vs 1
    assert len(regions[EMB]) > 1  # one chunk in both inputs: cut

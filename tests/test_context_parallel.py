"""Context parallelism of the block-diffusion layout gives the CP = 1 loss and gradients.

Pure checks first: a CP split reassembles the batch, the gathered keys are put
back in global order, a foreign partition is refused.  Then four real gloo
ranks run, per block size (1, 4, 32 and L = MDLM) with packed documents, the
same global batch as CP = 1 (the reference, whose fresh weights are saved),
CP = 2 (x DP = 2), CP = 4, TP = 2 x CP = 2 and PP = 2 x CP = 2 (loading those
weights); loss, counts and the reduced gradients (a dist checkpoint of
``main_grad``, resharded by Megatron, as in ``test_parallel_equivalence.py``)
must match to 1e-5 (fp32).
Last, the demo model trains through the CLI with CP = 2.
"""
from __future__ import annotations

import math
import tempfile

import pytest
import torch

from dist import run_distributed
from llada_cpt.config.schema import ParallelConfig
from llada_cpt.diffusion.inputs import build_diffusion_batch
from llada_cpt.parallel.context import cp_partition
from llada_cpt.parallel.cp_attention import global_key_order
from llada_cpt.parallel.cp_batch import layout_partition, split_batch
from test_parallel_equivalence import MODEL, VOCAB, _assert_same_grads, _plain, _save, _setup

L = 128
MASK_ID = VOCAB - 1
BLOCKS = (1, 4, 32, L)
# packed documents of unaligned lengths (not multiples of any block size), and one whole document
DOC_IDS = torch.stack([
    torch.repeat_interleave(torch.arange(4), torch.tensor([37, 21, 53, 17])),
    torch.zeros(L, dtype=torch.long),
])
PLAIN_DDP = dict(use_distributed_optimizer=False)
TOL = 1e-5


def _batch(block: int):
    g = torch.Generator().manual_seed(block)
    x0 = torch.randint(0, VOCAB - 1, DOC_IDS.shape, generator=g)
    return build_diffusion_batch(x0, DOC_IDS, block, MASK_ID, generator=g)


# ----------------------------------------------------------------------------- pure


@pytest.mark.parametrize("block", [4, L])
@pytest.mark.parametrize("cp", [2, 4])
def test_split_batch_reassembles_the_full_batch(block, cp):
    full = _batch(block)
    parts = [split_batch(full, cp, r) for r in range(cp)]
    L_copies = full.input_ids.shape[1]
    assert all(p.input_ids.shape == (2, L_copies // cp) for p in parts)
    seen = torch.zeros(L_copies, dtype=torch.long)
    for r, part in enumerate(parts):
        assert torch.equal(part.layout.local_positions, cp_partition(DOC_IDS, block, cp)[r])
        assert torch.equal(part.layout.doc_ids, full.layout.doc_ids)  # global document ids kept
        idx = part.layout.global_index(local=True)
        seen[idx] += 1
        for name in ("input_ids", "labels", "loss_weight"):
            assert torch.equal(getattr(part, name), getattr(full, name)[:, idx]), name
        assert torch.equal(part.layout.position_ids(local=True), full.layout.position_ids(local=False)[:, idx])
    assert torch.equal(seen, torch.ones_like(seen))  # every token of both halves held exactly once
    assert sum(int(p.num_eligible) for p in parts) == int(full.num_eligible)
    assert sum(int(p.masked.sum()) for p in parts) == int(full.masked.sum())
    assert sum(float(p.loss_weight.sum()) for p in parts) == pytest.approx(float(full.loss_weight.sum()))
    assert split_batch(full, 1, 0) is full
    with pytest.raises(ValueError, match="already split"):
        split_batch(parts[0], cp, 0)


@pytest.mark.parametrize("block", BLOCKS)
def test_gathered_keys_reorder_to_global_order(block):
    """Rank-order concatenation of every rank's tokens, permuted, is the global sequence."""
    full = _batch(block)
    cp = 4
    keys = torch.randn(full.input_ids.shape[1], 3)  # a stand-in for K, one row per global token
    gathered = torch.cat([keys[split_batch(full, cp, r).layout.global_index(local=True)] for r in range(cp)])
    for r in range(cp):
        local = split_batch(full, cp, r).layout
        assert torch.equal(gathered[global_key_order(local, cp, r)], keys)


def test_key_order_refuses_positions_of_another_partition():
    layout = _batch(4).layout
    parts = layout_partition(layout, 2)
    foreign = torch.arange(L // 2)  # contiguous halves: a valid split, but not this one
    assert not torch.equal(foreign, parts[0])
    with pytest.raises(ValueError, match="split_batch"):
        global_key_order(layout.with_local_positions(foreign), 2, 0)


def test_config_validation_of_context_parallel_layouts():
    from llada_cpt.config import config_from_dict, validate
    from llada_cpt.errors import ConfigError

    def cfg(**parallel):
        return config_from_dict({"model": {"preset": "tiny"}, "data": {"demo": True, "seq_length": 128},
                                 "parallel": parallel, "diffusion": {"block_schedule": [[4, 1], [128, 1]]},
                                 "train": {"micro_batch_size": 1, "global_batch_size": 4}})

    validate(cfg(context_parallel_size=2, tensor_model_parallel_size=2), world_size=8)  # dp = 2
    validate(cfg(context_parallel_size=4), world_size=4)
    with pytest.raises(ConfigError, match=r"tensor\(2\) x pipeline\(1\) x context\(2\) = 4"):
        validate(cfg(context_parallel_size=2, tensor_model_parallel_size=2), world_size=6)
    with pytest.raises(ConfigError, match="divisible by 2 \\* context_parallel_size = 6"):
        validate(cfg(context_parallel_size=3), world_size=3)


# ----------------------------------------------------------------------------- distributed


def run_layouts(layouts: dict, model_cfg: dict, out: str, blocks=BLOCKS) -> dict:
    """Run every block size under every layout on the ranks at hand; per layout its CP / DP sizes and,
    per block size, loss, counts, MoE aux losses and the reduced gradients (as plain tensors).

    The first layout builds fresh weights and saves them; every later layout loads them.
    """
    from megatron.core import parallel_state

    from llada_cpt.training.step import forward_backward

    results, weights = {}, None
    for tag, sizes in layouts.items():
        model, ddp = _setup(ParallelConfig(**sizes, **PLAIN_DDP), model_cfg, weights)
        if weights is None:
            weights = f"{out}/weights"
            _save(model, weights)
        results[tag] = {"cp": parallel_state.get_context_parallel_world_size(),
                        "dp": parallel_state.get_data_parallel_world_size()}
        for block in blocks:
            res = forward_backward(ddp, [_batch(block)])
            _save(model, f"{out}/grads_{tag}_{block}", grads=True)
            results[tag][block] = {"loss": res.loss, "count": res.num_eligible, "masked": res.num_masked,
                                   "aux": res.aux_losses, "grads": _plain(f"{out}/grads_{tag}_{block}")}
    return results


# name -> parallel sizes; on 4 ranks each layout leaves dp = 4 / (tp * cp) replicas
LAYOUTS = {
    "cp1": dict(),
    "cp2": dict(context_parallel_size=2),
    "cp4": dict(context_parallel_size=4),
    "tp2cp2": dict(context_parallel_size=2, tensor_model_parallel_size=2),
    "pp2cp2": dict(context_parallel_size=2, pipeline_model_parallel_size=2),
}


def _layouts(rank: int, world: int, out: str) -> dict:
    """Every layout on the same 4 ranks (one spawn: process start-up dominates on CPU).

    Each data-parallel replica runs the *whole* batch, so with per-token
    normalisation the result is that of one replica (``dp * S / (dp * N)``); the
    CP = 1 reference is thus a DP-only run (equal to one rank, see
    ``test_parallel_equivalence.py``) whose fresh weights every CP layout loads.
    """
    results = run_layouts(LAYOUTS, MODEL, out)
    for tag, sizes in LAYOUTS.items():
        assert results[tag]["cp"] == sizes.get("context_parallel_size", 1)
    return results


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as out:
        return run_distributed(_layouts, 4, out)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("layout", ["cp2", "cp4", "tp2cp2", "pp2cp2"])
def test_context_parallel_gives_reference_loss_and_grads(runs, layout, block):
    want = runs[0]["cp1"][block]
    n = DOC_IDS.numel()
    assert runs[0]["cp1"]["dp"] == 4 and want["count"] == 4 * n and want["masked"] > 0
    for rank_result in runs:  # every rank reports the global loss and counts
        got = rank_result[layout][block]
        dp = rank_result[layout]["dp"]
        assert got["count"] == dp * n and got["masked"] * 4 == want["masked"] * dp
        assert math.isfinite(got["loss"]) and abs(got["loss"] - want["loss"]) <= TOL * abs(want["loss"])
    _assert_same_grads(want["grads"], runs[0][layout][block]["grads"])


# ----------------------------------------------------------------------------- end to end


@pytest.mark.timeout(600)
def test_demo_trains_with_context_parallel_through_the_cli(tmp_path):
    """``llada-cpt train --nproc 2 parallel.context_parallel_size=2``: BDLM then MDLM steps, finite losses."""
    from llada_cpt.data.demo_corpus import ensure_demo_data
    from run_helpers import TINY_CONFIG, cli, run, step_log

    ensure_demo_data()  # the shared default cache (built once per machine), as the run itself uses
    save = tmp_path / "run"
    proc = run(cli("train", "-c", str(TINY_CONFIG), "--nproc", "2", "parallel.context_parallel_size=2",
                   "train.train_steps=4", "train.global_batch_size=4", "train.micro_batch_size=2",
                   "diffusion.block_schedule=[[4,2],[128,100]]", "train.lr_warmup_steps=1",
                   f"checkpoint.save_dir={save}", "logging.log_interval=1", "logging.eval_iters=1"),
               cwd=tmp_path, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=1" in proc.stdout  # both processes are one data-parallel replica: CP, not DP
    assert "step 2: block size 128 -> layout MDLM" in proc.stdout
    log = step_log(save)
    assert sorted(log) == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log.values()), log
    assert (save / "latest").read_text().strip() == "iter_0000004"

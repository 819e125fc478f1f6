"""An MoE model under context parallelism gives the CP = 1 loss and gradients, router included.

Megatron scales the load-balancing (aux) loss gradient by the *local* token
count under per-token loss normalisation, which makes the router gradient
1/cp too small with CP (``llada_cpt/megatron_patches/moe_aux_loss.py`` fixes that; without
the patch the router gradient was ~25% off at CP = 2).  Two gloo ranks run the
same packed batch (block size 4 and L = MDLM) on the ``tiny-moe`` preset, with a
non-negligible aux-loss coefficient, as CP = 1 (DP = 2, each replica the whole
batch: the one-replica result, see ``test_context_parallel.py``; its fresh
weights are saved) and as CP = 2 (loading them).  Loss, aux loss and every
reduced gradient must match to 1e-5 (fp32).
"""
from __future__ import annotations

import math
import tempfile

import pytest

from dist import run_distributed
from llada_cpt.config.presets import preset_dict
from llada_cpt.config.schema import ModelConfig
from test_context_parallel import DOC_IDS, L, run_layouts
from test_parallel_equivalence import TOL, _assert_same_grads

BLOCKS = (4, L)
# tiny-moe cut to one dense + one MoE layer (4 experts, top-2, aux-loss router); vocab 128 as in the harness
MOE = dict(preset_dict("tiny-moe"), num_layers=2, moe_aux_loss_coeff=1e-2, make_vocab_size_divisible_by=64)
assert ModelConfig(**MOE).moe_router_load_balancing_type == "aux_loss"
LAYOUTS = {"cp1": dict(), "cp2": dict(context_parallel_size=2)}


def _moe_layouts(rank: int, world: int, out: str) -> dict:
    return run_layouts(LAYOUTS, MOE, out, BLOCKS)


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as out:
        return run_distributed(_moe_layouts, 2, out)


@pytest.mark.parametrize("block", BLOCKS)
def test_moe_context_parallel_gives_reference_loss_and_grads(runs, block):
    n = DOC_IDS.numel()
    assert [(r["cp1"]["cp"], r["cp1"]["dp"], r["cp2"]["cp"], r["cp2"]["dp"]) for r in runs] == [(1, 2, 2, 1)] * 2
    want = runs[0]["cp1"][block]
    lb = want["aux"].get("load_balancing_loss", 0.0)
    assert lb > 0, want["aux"]  # the aux loss is live, so its gradient reaches the router
    for rank_result in runs:  # every rank reports the global loss, count and aux loss
        got = rank_result["cp2"][block]
        assert want["count"] == 2 * n and got["count"] == n  # eligible tokens summed over the dp replicas
        assert math.isfinite(got["loss"]) and abs(got["loss"] - want["loss"]) <= TOL * abs(want["loss"])
        assert abs(got["aux"]["load_balancing_loss"] - lb) <= TOL * lb
    routers = [k for k in want["grads"] if "router" in k]
    assert routers, sorted(want["grads"])
    _assert_same_grads(want["grads"], runs[0]["cp2"][block]["grads"])

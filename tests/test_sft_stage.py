"""The ``sft`` stage: batches (complementary masks, band, DP-independent noise, resume), CAP and
layout equivalence through the real step, a CLI run, and bad data through the CLI."""
from __future__ import annotations

import json
import math
import re
import types

import pytest
import torch

from dist import max_diff, run_distributed
from run_helpers import REPO, assert_clean_error, cli, run
from stage_runs import SFT_STEPS, mean, sft_run, small_config, step_records, validation_losses

pytestmark = pytest.mark.timeout(900)


def _fake_run(dp_rank: int, dp_size: int, cfg, mask_id: int):
    per_step = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp_size)
    return types.SimpleNamespace(dp_rank=dp_rank, dp_size=dp_size, micro_batches_per_step=per_step, mask_id=mask_id)


def _prepared(*overrides: str):
    from llada_cpt.stages.sft import SFTStage

    cfg = small_config("sft", *overrides)
    stage = SFTStage(cfg)
    _, mask_id = stage.prepare(cfg)
    return cfg, stage, mask_id


def _rows(batches, key: str):
    """The first copies (rows ``[:b]``) of every micro-batch, stacked; the complements separately."""
    first = [getattr(b, key)[: b.input_ids.shape[0] // 2] for b in batches]
    second = [getattr(b, key)[b.input_ids.shape[0] // 2:] for b in batches]
    return torch.cat(first), torch.cat(second)


def test_sft_batches_complementary_band_dp_independent_and_resumable():
    cfg, stage, mask_id = _prepared("diffusion.mask_ratio_min=0.2", "diffusion.mask_ratio_max=0.6")
    single = stage.step_data(_fake_run(0, 1, cfg, mask_id), 32).micro_batches
    masked, complement = _rows(single, "masked")
    eligible, _ = _rows(single, "eligible")
    # each response token is masked in exactly one of the pair's two rows; prompts and filler never
    assert torch.equal(masked ^ complement, eligible) and not (masked & complement).any()
    assert eligible.any() and not eligible.all()
    t, t_complement = _rows(single, "t")
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.6  # the band (the complement has ratio 1 - t)
    assert torch.allclose(t_complement, 1 - t)
    # two DP ranks with micro-batches of one sequence: positions 0, 2 on rank 0 and 1, 3 on rank 1,
    # yet every position gets the same sequence and the same noise
    _, stage2, _ = _prepared("diffusion.mask_ratio_min=0.2", "diffusion.mask_ratio_max=0.6", "train.micro_batch_size=1")
    ranks = []
    for r in (0, 1):  # one stage object plays both ranks: rewind to the step's start
        stage2.position = 0
        ranks.append(stage2.step_data(_fake_run(r, 2, stage2.cfg, mask_id), 32).micro_batches)
    by_position = [ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]]
    for key in ("input_ids", "masked", "loss_weight"):
        assert torch.equal(_rows(single, key)[0], torch.cat([_rows([b], key)[0] for b in by_position])), key
    # resume: a fresh stage loaded from the state continues with the very same batches
    stage.step_data(_fake_run(0, 1, cfg, mask_id), 32)
    _, resumed, _ = _prepared("diffusion.mask_ratio_min=0.2", "diffusion.mask_ratio_max=0.6")
    resumed.load_state_dict(stage.state_dict())
    assert resumed.position == 2 * cfg.train.global_batch_size
    want = stage.step_data(_fake_run(0, 1, cfg, mask_id), 32).micro_batches
    got = resumed.step_data(_fake_run(0, 1, cfg, mask_id), 32).micro_batches
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.masked, b.masked) for a, b in zip(want, got))


def _grads(run) -> list:
    return [p.main_grad.detach().clone() for chunk in run.model_chunks for p in chunk.parameters()]


def _trained_sft(out: str):
    """``(cfg, stage, run)`` after two SFT steps, saved to ``out/w``: some masked tokens are then predicted
    right (CAP acts on them)."""
    from llada_cpt.checkpoint import megatron as ckpt
    from llada_cpt.stages.sft import SFTStage
    from llada_cpt.training.loop import build_run, run_step

    cfg = small_config("sft", "train.lr=3e-3")
    stage = SFTStage(cfg)
    run = build_run(cfg, stage)
    for _ in range(2):
        data = stage.step_data(run, 32)
        run.optimizer.zero_grad()
        run_step(run, stage, data.micro_batches, forward_only=False)
        run.optimizer.step()
    ckpt.save_checkpoint(f"{out}/w", 2, run.model_chunks, None, None, {}, cfg)
    return cfg, stage, run


def _sft_layouts(rank: int, world: int, out: str) -> dict:
    """TP=1 x DP=2: plain SFT vs CAP(0) vs CAP(0.5) gradients; TP=2 and PP=2 from the same weights: the losses."""
    from llada_cpt.stages.sft import SFTStage, sft_loss
    from llada_cpt.training.loop import build_run, run_step

    results = {}
    cfg, stage, run = _trained_sft(out)
    position = stage.position
    batches = stage.step_data(run, 32).micro_batches
    for name, lam in (("plain", None), ("cap0", 0.0), ("cap", 0.5)):
        stage.loss = sft_loss(lam)
        run.optimizer.zero_grad()  # as the loop does: drops the param.grad views the optimizer step left
        res = run_step(run, stage, batches, forward_only=False)
        results[name] = {"loss": res.loss, "eligible": res.num_eligible, "metrics": res.metrics, "grads": _grads(run)}
    for layout, parallel in (("tp2", "tensor"), ("pp2", "pipeline")):
        other = small_config("sft", f"train.init_from={out}/w", f"parallel.{parallel}_model_parallel_size=2")
        stage2 = SFTStage(other)
        run2 = build_run(other, stage2)
        stage2.position = position
        batches2 = stage2.step_data(run2, 32).micro_batches
        for name, lam in (("plain", None), ("cap", 0.5)):
            stage2.loss = sft_loss(lam)
            run2.optimizer.zero_grad()
            res = run_step(run2, stage2, batches2, forward_only=False)
            results[f"{layout}_{name}"] = {"loss": res.loss, "eligible": res.num_eligible, "metrics": res.metrics}
    return results


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return run_distributed(_sft_layouts, 2, str(tmp_path_factory.mktemp("sft_layouts")), timeout=600)


def test_cap_with_lambda_zero_has_the_plain_sft_gradients_and_lambda_changes_them(layouts):
    for per_rank in layouts:
        plain, cap0, cap = per_rank["plain"], per_rank["cap0"], per_rank["cap"]
        scale = max(float(g.abs().max()) for g in plain["grads"])
        assert scale > 0
        assert math.isclose(cap0["loss"], plain["loss"], rel_tol=1e-6)
        assert max_diff(cap0["grads"], plain["grads"]) <= 1e-5 * scale
        m = cap["metrics"]
        assert 0 < m["cap_correct"] <= 1 and m["cap_term"] > 0 and m["cap_correct_tokens"] > 0  # some are right
        assert math.isclose(m["sft_loss"], plain["loss"], rel_tol=1e-6)
        # both terms logged; the loss is L_SFT + lambda * L_conf, L_conf the mean over the correct tokens
        assert math.isclose(cap["loss"], m["sft_loss"] + 0.5 * m["cap_term"], rel_tol=1e-6)
        # near-uniform predictions have a small entropy gradient, but far above rounding
        changed = max_diff(cap["grads"], plain["grads"])
        assert changed > 1e-4 * scale and changed > 100 * max_diff(cap0["grads"], plain["grads"])


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_sft_and_cap_losses_are_independent_of_the_parallel_layout(layouts, layout):
    for per_rank in layouts:
        for name in ("plain", "cap"):
            got, want = per_rank[f"{layout}_{name}"], per_rank[name]
            assert got["eligible"] == want["eligible"]
            assert math.isclose(got["loss"], want["loss"], rel_tol=1e-5), (layout, name, got["loss"], want["loss"])
        for key, value in per_rank["cap"]["metrics"].items():
            assert math.isclose(per_rank[f"{layout}_cap"]["metrics"][key], value, rel_tol=1e-5, abs_tol=1e-6), key


@pytest.fixture(scope="module")
def sft_cli(tmp_path_factory):
    return sft_run(tmp_path_factory.getbasetemp() / "stage_runs")


def test_sft_cli_run_from_a_cpt_checkpoint_lowers_the_loss(sft_cli):
    assert sft_cli["returncode"] == 0, sft_cli["stderr"]
    out = sft_cli["stdout"]
    report = re.search(r"sft data \(.*block size 32 from the trained block size of .*\): (\d+) samples from "
                       r"(\d+) lines -> \d+ sequences .*truncated \d+, dropped \d+ over-long", out)
    assert report and report.group(2) == "121", out[-3000:]
    assert "initialised weights from" in out and "complementary masks on; CAP lambda 0.1" in out
    records = step_records(sft_cli["save_dir"])
    assert [r["step"] for r in records] == list(range(1, SFT_STEPS + 1))
    assert all(k in records[0] for k in ("sft_loss", "cap_term", "cap_correct", "cap_correct_tokens"))
    assert mean([r["sft_loss"] for r in records[-4:]]) < mean([r["sft_loss"] for r in records[:4]]) - 0.3
    val = validation_losses(out)
    assert val[SFT_STEPS] < val[0] - 0.3, val
    save = sft_cli["save_dir"]
    last = save / f"iter_{SFT_STEPS:07d}"
    assert (save / "latest").read_text().strip() == last.name
    saved = (last / "config.yaml").read_text()
    assert "stage: sft" in saved and re.search(r"block_schedule:\n\s*- - 32\n\s*- 1\n", saved)


def test_bad_sft_lines_are_reported_with_line_numbers_through_the_cli(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"prompt": "only a prompt"}),
        json.dumps({"prompt": "q", "response": "   "}),
        json.dumps({"prompt": "q", "response": "word " * 400}),
        json.dumps({"prompt": "q", "response": "fine"}),
    ]) + "\n")
    proc = run(cli("sft", "-c", str(REPO / "configs" / "tiny_sft.yaml"), "train.init_from=null",
                   f"sft.data=[{bad}]", "sft.overlong=error", f"checkpoint.save_dir={tmp_path / 'run'}"),
               cwd=tmp_path, timeout=300)
    line = assert_clean_error(proc, "sft", "over-long", "missing field", "empty")
    for n in (1, 2, 3):
        assert f"{bad}:{n}:" in line
    assert f"{bad}:4:" not in line
    assert not (tmp_path / "run").exists()


# --------------------------------------------- CAP normalisation and embedding noise across layouts

NOISE = ("diffusion.embedding_noise_steps=100", "diffusion.embedding_noise_std=0.02")
CAP_LAMBDA = 0.5


def _hand_cap(run, batches) -> dict:
    """L_conf by hand (TP=1): the mean entropy over masked x_t tokens whose argmax is the target, over the
    global batch (sums all-reduced over DP), and the gradient of ``lambda * L_conf`` by autograd."""
    import torch.distributed as dist

    from llada_cpt.diffusion.cap import token_entropy
    from llada_cpt.model.wrappers import unwrap

    model = unwrap(run.model_chunks[0])
    params = [p for p in model.parameters()]
    entropy_sum, correct = torch.zeros(()), torch.zeros(())
    for b in batches:
        L = b.layout.seq_length
        logits = model(b.input_ids, b.layout.position_ids(local=True), attention_mask=b.layout)[:, :L].float()
        masked = b.loss_weight[:, :L] > 0
        right = masked & (logits.argmax(-1) == b.labels[:, :L])
        entropy_sum = entropy_sum + token_entropy(logits[right]).sum()
        correct = correct + right.sum()
    grads = torch.autograd.grad(entropy_sum, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.detach().clone() for g, p in zip(grads, params)]
    sums = torch.stack([entropy_sum.detach(), correct.float()])
    dist.all_reduce(sums)
    for g in grads:
        dist.all_reduce(g)
    n = float(sums[1])
    return {"mean": float(sums[0]) / n, "correct": n, "grads": [CAP_LAMBDA * g / n for g in grads]}


def _sft_noise_cap_layouts(rank: int, world: int, out: str) -> dict:
    """With masked-embedding noise on: plain SFT and CAP losses / metrics under DP2 x 1 micro-batch, DP2 x 2,
    DP1 (TP2) x 2 and DP1 (TP2) x 4 micro-batches from the same weights; on DP2 x 1 also CAP by hand."""
    from llada_cpt.stages.sft import SFTStage, sft_loss
    from llada_cpt.training.loop import build_run, run_step

    position = _trained_sft(out)[1].position
    results = {}
    for name, over in (("dp2_mb1", ()), ("dp2_mb2", ("train.micro_batch_size=1",)),
                       ("dp1_mb2", ("parallel.tensor_model_parallel_size=2",)),
                       ("dp1_mb4", ("parallel.tensor_model_parallel_size=2", "train.micro_batch_size=1"))):
        other = small_config("sft", f"train.init_from={out}/w", *NOISE, *over)
        stage2 = SFTStage(other)
        run2 = build_run(other, stage2)
        stage2.position = position
        batches = stage2.step_data(run2, 32).micro_batches
        for loss_name, lam in (("plain", None), ("cap", CAP_LAMBDA)):
            stage2.loss = sft_loss(lam)
            run2.optimizer.zero_grad()
            res = run_step(run2, stage2, batches, forward_only=False)
            results[f"{name}_{loss_name}"] = {"loss": res.loss, "metrics": res.metrics, "grads": _grads(run2)}
        if name == "dp2_mb1":
            results["hand"] = _hand_cap(run2, batches)
        for loss_name in ("plain", "cap"):
            if name != "dp2_mb1":
                del results[f"{name}_{loss_name}"]["grads"]
    return results


@pytest.fixture(scope="module")
def noise_cap_layouts(tmp_path_factory):
    return run_distributed(_sft_noise_cap_layouts, 2, str(tmp_path_factory.mktemp("sft_noise_cap")), timeout=800)


@pytest.mark.parametrize("layout", ["dp2_mb2", "dp1_mb2", "dp1_mb4"])
def test_sft_with_embedding_noise_has_the_same_losses_on_every_layout(noise_cap_layouts, layout):
    """The masked-embedding noise of a sample is seeded by its position (``layout.row_seeds``), not by the
    DP rank and the number of forward calls."""
    for per_rank in noise_cap_layouts:
        for name in ("plain", "cap"):
            got, want = per_rank[f"{layout}_{name}"]["loss"], per_rank[f"dp2_mb1_{name}"]["loss"]
            assert math.isclose(got, want, rel_tol=1e-5), (layout, name, got, want)


def test_cap_term_is_the_mean_entropy_over_correct_tokens_on_every_layout(noise_cap_layouts):
    for per_rank in noise_cap_layouts:
        hand, cap, plain = per_rank["hand"], per_rank["dp2_mb1_cap"], per_rank["dp2_mb1_plain"]
        m = cap["metrics"]
        assert hand["correct"] > 0 and m["cap_correct_tokens"] == hand["correct"]
        assert math.isclose(m["cap_term"], hand["mean"], rel_tol=1e-5), (m["cap_term"], hand["mean"])
        assert math.isclose(cap["loss"], m["sft_loss"] + CAP_LAMBDA * hand["mean"], rel_tol=1e-5)
        assert math.isclose(m["sft_loss"], plain["loss"], rel_tol=1e-6)
        # gradients: L_SFT's plus lambda * grad(mean entropy over the correct tokens)
        scale = max(float(g.abs().max()) for g in hand["grads"])
        assert scale > 0
        diff = [c - p for c, p in zip(cap["grads"], plain["grads"])]
        assert max_diff(diff, hand["grads"]) <= 1e-4 * scale, max_diff(diff, hand["grads"]) / scale
        for layout in ("dp2_mb2", "dp1_mb2", "dp1_mb4"):
            other = per_rank[f"{layout}_cap"]["metrics"]
            for key in ("cap_term", "cap_correct_tokens", "sft_loss"):
                assert math.isclose(other[key], m[key], rel_tol=1e-5), (layout, key, other[key], m[key])

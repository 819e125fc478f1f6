"""LM head + cross entropy without materialised logits equals the plain head + Megatron's cross entropy.

``kernels/linear_cross_entropy.py`` is checked three ways: against ``F.cross_entropy`` on
full logits (one process, chunk sizes that do not divide the token count, fp32 and bf16);
against Megatron's ``vocab_parallel_cross_entropy`` on TP=2 vocabulary shards (two gloo
ranks, loss and both gradients); and as the model's head inside the real training step
(``model.fused_cross_entropy``) on the BDLM layout, whose head sees the x_t half only: loss
and every parameter's reduced gradient equal the plain path at TP=1 (DP=2) and TP=2, with
tied and untied embeddings; the chunked head computes only the positions with loss weight.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist import run_distributed
from llada_cpt.config.schema import ModelConfig, ParallelConfig

VOCAB = 128
L = 16


def _plain(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="none")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [5, 64, None])
def test_matches_full_logits_cross_entropy(dtype, tol, chunk):
    from llada_cpt.kernels.linear_cross_entropy import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(23, 16, generator=g).to(dtype)
    w0 = (torch.randn(40, 16, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, 40, (23,), generator=g)
    upstream = torch.rand(23, generator=g)
    out = []
    for fn in (_plain, lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=chunk)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w, labels)
        (loss * upstream).sum().backward()
        out.append((loss.detach(), h.grad.float(), w.grad.float()))
    (l0, gh0, gw0), (l1, gh1, gw1) = out
    assert l1.dtype == torch.float32 and l1.shape == labels.shape
    torch.testing.assert_close(l1, l0, rtol=tol, atol=tol)
    torch.testing.assert_close(gh1, gh0, rtol=tol, atol=tol)
    torch.testing.assert_close(gw1, gw0, rtol=tol, atol=tol)


def test_shapes_must_line_up():
    from llada_cpt.kernels.linear_cross_entropy import linear_cross_entropy

    with pytest.raises(ValueError, match="do not line up"):
        linear_cross_entropy(torch.zeros(4, 3, 8), torch.zeros(10, 8), torch.zeros(3, 4, dtype=torch.long))


def test_selection():
    from llada_cpt.errors import ConfigError
    from llada_cpt.kernels.linear_cross_entropy import use_fused_cross_entropy as use

    assert use("auto", False, cuda=True) and not use("auto", False, cuda=False)
    assert not use("auto", True, cuda=True)  # sequence parallelism: Megatron's path
    assert use("chunked", False, cuda=False) and not use("megatron", False, cuda=True)
    with pytest.raises(ConfigError, match="sequence_parallel"):
        use("chunked", True, cuda=True)
    with pytest.raises(ConfigError, match="not one of"):
        use("yes", False, cuda=True)


def test_config_validation_names_the_knob():
    from llada_cpt.config.loader import load_config
    from llada_cpt.config.validation import validate
    from llada_cpt.errors import ConfigError

    base = ["data.demo=true", "model.vocab_size=128"]
    with pytest.raises(ConfigError, match="model.fused_cross_entropy `maybe` is not one of auto, chunked, megatron"):
        validate(load_config(None, base + ["model.fused_cross_entropy=maybe"]))
    with pytest.raises(ConfigError, match="fused_cross_entropy=chunked does not support parallel.sequence_parallel"):
        validate(load_config(None, base + ["model.fused_cross_entropy=chunked", "parallel.sequence_parallel=true",
                                           "parallel.tensor_model_parallel_size=2"]), world_size=2)


def _batches(rows):
    from llada_cpt.diffusion.inputs import build_diffusion_batch

    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, VOCAB - 1, (4, L), generator=g)
    doc = torch.tensor([[0] * 5 + [1] * 11, [0] * 16, [0] * 9 + [1] * 7, [0] * 3 + [1] * 13])
    full = build_diffusion_batch(x0, doc, 4, VOCAB - 1, generator=g)
    pairs = [rows[i:i + 2] for i in range(0, len(rows), 2)]  # micro-batches of 2 sequences: [S, b] order matters
    return [build_diffusion_batch(full.labels[r, :L], doc[r], 4, VOCAB - 1, masked=full.masked[r], t=full.t[r])
            for r in pairs]


def _vocab_parallel(rank: int, world: int) -> dict:
    """TP=2 shards: the kernel vs Megatron's vocab_parallel_cross_entropy on the local logits."""
    from megatron.core import parallel_state, tensor_parallel

    from llada_cpt.kernels.linear_cross_entropy import linear_cross_entropy
    from llada_cpt.training.distributed import initialize

    initialize(ParallelConfig(tensor_model_parallel_size=2), seed=1)
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(7, 2, 16, generator=g)  # [S, b, h] as the head sees it
    w_full = torch.randn(64, 16, generator=g) * 0.5
    labels = torch.randint(0, 64, (7, 2), generator=g)
    upstream = torch.rand(7, 2, generator=g)
    w0 = w_full.chunk(2)[parallel_state.get_tensor_model_parallel_rank()].clone()
    out = {}
    for name in ("megatron", "fused"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if name == "megatron":
            # ColumnParallelLinear's input copy: identity forward, all-reduce of the input grad
            hp = tensor_parallel.copy_to_tensor_model_parallel_region(h)
            loss = tensor_parallel.vocab_parallel_cross_entropy(hp @ w.t(), labels)
        else:
            loss = linear_cross_entropy(h, w, labels, parallel_state.get_tensor_model_parallel_group(), chunk_tokens=3)
        (loss * upstream).sum().backward()
        out[name] = (loss.detach(), h.grad, w.grad)
    return out


def test_vocab_parallel_tp2_matches_megatron():
    for res in run_distributed(_vocab_parallel, 2):
        for a, b in zip(res["megatron"], res["fused"]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _model_step(rank: int, world: int) -> dict:
    """The real step with model.fused_cross_entropy off and on, same weights and batches."""
    from megatron.core import parallel_state

    from llada_cpt.model.provider import build_model
    from llada_cpt.training.distributed import initialize, wrap_ddp
    from llada_cpt.training.step import forward_backward

    out = {}
    layouts = {"tp2": ParallelConfig(tensor_model_parallel_size=2, use_distributed_optimizer=False),
               "dp2": ParallelConfig(use_distributed_optimizer=False)}
    for name, parallel in layouts.items():
        for tied in (False, True):
            initialize(parallel, seed=3)
            model_cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                                    num_query_groups=2, make_vocab_size_divisible_by=64,
                                    untie_embeddings_and_output_weights=not tied)
            (model,) = build_model(model_cfg, parallel, "fp32", vocab_size=VOCAB)
            assert model.fused_cross_entropy is False  # auto on CPU
            (ddp,) = wrap_ddp([model], parallel)
            dp, dps = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
            rows = list(range(4))[dp::dps]
            for fused in (False, True):
                model.fused_cross_entropy = fused
                res = forward_backward([ddp], _batches(rows))
                out[(name, tied, fused)] = {
                    "loss": res.loss,
                    "grads": {n: p.main_grad.detach().clone() for n, p in model.named_parameters()},
                }
    return out


def test_model_step_equal_with_fused_head():
    for res in run_distributed(_model_step, 2):
        for name in ("tp2", "dp2"):
            for tied in (False, True):
                plain, fused = res[(name, tied, False)], res[(name, tied, True)]
                assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-6)
                assert plain["grads"].keys() == fused["grads"].keys()
                for n, g in plain["grads"].items():
                    torch.testing.assert_close(fused["grads"][n], g, rtol=1e-5, atol=1e-7, msg=f"{name} {tied} {n}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_equals_plain_path_with_less_memory():
    """bf16 on the GPU, a 32k vocabulary: same loss and gradients as full logits, lower peak memory."""
    from llada_cpt.kernels.linear_cross_entropy import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    h0 = torch.randn(4096, 1024, device="cuda", generator=g).bfloat16()
    w0 = (torch.randn(32768, 1024, device="cuda", generator=g) * 0.03).bfloat16()
    labels = torch.randint(0, 32768, (4096,), device="cuda", generator=g)
    out, peaks = [], []
    for fn in (_plain, linear_cross_entropy):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(h, w, labels).sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        out.append((fn(h0, w0, labels).float(), h.grad.float(), w.grad.float()))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
    assert peaks[1] < peaks[0], peaks

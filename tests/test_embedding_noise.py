"""Masked-embedding noise: only mask tokens of x_t move, sigma decays to 0, SP slices agree."""
from __future__ import annotations

import math

import pytest
import torch

from llada_cpt.config.schema import DiffusionConfig
from llada_cpt.diffusion.inputs import build_diffusion_batch
from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.errors import ConfigError
from llada_cpt.model.embedding_noise import EmbeddingNoise, add_masked_embedding_noise, noise_std, noised_positions

L, H, MASK_ID = 16, 8, 99
DOC_IDS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])


def _batch(block_size: int):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK_ID, (2, L), generator=g)
    return build_diffusion_batch(x0, DOC_IDS, block_size, MASK_ID, generator=g)


def test_sigma_decays_to_zero_after_configured_steps():
    assert noise_std(0, 0.2, 10) == pytest.approx(0.2)
    assert noise_std(5, 0.2, 10) == pytest.approx(0.1)
    assert noise_std(5, 0.2, 10, "cosine") == pytest.approx(0.1)
    assert noise_std(2, 0.2, 10, "cosine") == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.2)))
    assert noise_std(9, 0.2, 10) > 0
    assert all(noise_std(s, 0.2, 10, d) == 0.0 for s in (10, 11, 1000) for d in ("linear", "cosine"))
    assert noise_std(0, 0.2, 0) == 0.0 and noise_std(0, 0.0, 10) == 0.0
    with pytest.raises(ConfigError, match="embedding_noise_decay"):
        noise_std(0, 0.2, 10, "exp")


@pytest.mark.parametrize("block_size", [4, L])
def test_only_mask_tokens_of_xt_change(block_size):
    batch = _batch(block_size)
    S = batch.input_ids.shape[1]
    emb = torch.randn(S, 2, H, generator=torch.Generator().manual_seed(1))
    positions = noised_positions(batch.input_ids, batch.layout, MASK_ID)
    out = add_masked_embedding_noise(emb, positions, 0.5, torch.Generator().manual_seed(2))
    changed = (out != emb).any(-1).transpose(0, 1)
    expected = torch.zeros(2, S, dtype=torch.bool)
    expected[:, :L] = batch.masked  # BDLM: x_t is the first half; MDLM: the whole input
    assert batch.masked.any() and torch.equal(changed, expected)
    assert torch.equal(out[~changed.transpose(0, 1)], emb[~changed.transpose(0, 1)])  # bit-identical
    assert out.is_contiguous()  # pipeline send/recv of the embedding output requires it
    # the x_0 copy of a BDLM input never holds mask tokens; a causal (AR) input has no x_t at all
    causal = AttentionLayout(doc_ids=DOC_IDS, block_size=1, causal=True)
    assert not noised_positions(torch.full((2, L), MASK_ID), causal, MASK_ID).any()


def test_zero_sigma_is_identity_and_noise_has_the_configured_scale():
    batch = _batch(4)
    positions = noised_positions(batch.input_ids, batch.layout, MASK_ID)
    emb = torch.zeros(2 * L, 2, 256)
    assert add_masked_embedding_noise(emb, positions, 0.0) is emb
    out = add_masked_embedding_noise(emb, positions, 0.3, torch.Generator().manual_seed(3))
    sel = positions.transpose(0, 1)
    assert out[sel].std().item() == pytest.approx(0.3, rel=0.05)


def test_sequence_parallel_slices_match_the_full_draw():
    batch = _batch(4)
    positions = noised_positions(batch.input_ids, batch.layout, MASK_ID)
    emb = torch.randn(2 * L, 2, H)
    full = add_masked_embedding_noise(emb, positions, 0.5, torch.Generator().manual_seed(4))
    tp = 4
    n = 2 * L // tp
    parts = [
        add_masked_embedding_noise(emb[r * n : (r + 1) * n], positions, 0.5, torch.Generator().manual_seed(4), r * n)
        for r in range(tp)
    ]
    assert torch.equal(torch.cat(parts), full)


class _TinyLM(torch.nn.Module):
    """The two attributes the hooks rely on: ``embedding(input_ids=...)`` -> ``[S, b, h]``."""

    def __init__(self):
        super().__init__()
        self.pre_process = True
        self.table = torch.nn.Embedding(MASK_ID + 1, H)
        self.embedding = _Emb(self.table)

    def forward(self, input_ids, position_ids, attention_mask=None):
        return self.embedding(input_ids=input_ids, position_ids=position_ids)


class _Emb(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, position_ids):
        return self.table(input_ids).transpose(0, 1)


def test_hook_follows_set_step_and_stops_after_configured_steps():
    batch = _batch(4)
    model = _TinyLM()
    clean = model(batch.input_ids, batch.position_ids, attention_mask=batch.layout)
    cfg = DiffusionConfig(embedding_noise_std=1.0, embedding_noise_steps=3)
    noise = EmbeddingNoise(cfg, MASK_ID, seed=5, dp_rank=0).attach(model)
    outs = {}
    for step in (0, 2, 3, 7):
        noise.set_step(step)
        outs[step] = model(batch.input_ids, batch.position_ids, attention_mask=batch.layout)
    sel = noised_positions(batch.input_ids, batch.layout, MASK_ID).transpose(0, 1)
    # early steps: masked x_t positions move, by less as sigma decays; the rest is untouched
    d0, d2 = ((outs[s] - clean)[sel].abs().mean().item() for s in (0, 2))
    assert d0 > d2 > 0
    assert torch.equal(outs[0][~sel], clean[~sel])
    # from the configured number of steps on, the forward is exactly noise-free
    assert torch.equal(outs[3], clean) and torch.equal(outs[7], clean)
    # the same step and micro-batch index draw the same noise (identical on every TP rank)
    noise.set_step(0)
    assert torch.equal(model(batch.input_ids, batch.position_ids, attention_mask=batch.layout), outs[0])
    noise.detach()
    assert torch.equal(model(batch.input_ids, batch.position_ids, attention_mask=batch.layout), clean)


def test_row_seeded_noise_is_independent_of_batch_split_and_cp_slice():
    from llada_cpt.model.embedding_noise import layout_noise

    doc = torch.zeros(3, 8, dtype=torch.long)
    full = AttentionLayout(doc_ids=doc, block_size=4, row_seeds=torch.tensor([11, 22, 33]))
    whole = layout_noise(full, step=5, hidden=6, device=torch.device("cpu"))  # [2L, b, h]
    assert whole.shape == (16, 3, 6)
    # the same sample in another micro-batch (another row position, other neighbours): same noise
    alone = AttentionLayout(doc_ids=doc[1:2], block_size=4, row_seeds=torch.tensor([22]))
    assert torch.equal(layout_noise(alone, 5, 6, torch.device("cpu"))[:, 0], whole[:, 1])
    # a context-parallel rank holding positions {0, 1, 6, 7} of each half gets exactly those rows
    local = alone.with_local_positions(torch.tensor([0, 1, 6, 7]))
    expect = whole[:, 1][torch.tensor([0, 1, 6, 7, 8, 9, 14, 15])]
    assert torch.equal(layout_noise(local, 5, 6, torch.device("cpu"))[:, 0], expect)
    # another step draws other noise
    cpu = torch.device("cpu")
    assert not torch.equal(layout_noise(alone, 6, 6, cpu), layout_noise(alone, 5, 6, cpu))


def _noise_free_eval_and_sampling(rank: int, world: int) -> dict:
    """A real SFT run at step 0 with strong masked-embedding noise: the training forward is noised, the
    validation loss and the sampler's tokens and log-probs are those of the noise-free model."""
    from llada_cpt.data.tokenizer import resolve_tokenizer
    from llada_cpt.inference.generation import generate
    from llada_cpt.inference.sampler import SamplerConfig
    from llada_cpt.stages.sft import SFTStage
    from llada_cpt.training.loop import build_run, evaluate, run_step
    from stage_runs import small_config

    cfg = small_config("sft", "diffusion.embedding_noise_steps=10", "diffusion.embedding_noise_std=1.0")
    stage = SFTStage(cfg)
    run = build_run(cfg, stage)
    run.embedding_noise.set_step(run.iteration)  # what the loop does before a step
    batches = stage.step_data(run, 32).micro_batches
    sampler = SamplerConfig(block_size=32, threshold=0.9, max_new_tokens=16, temperature=0.0, mask_id=run.mask_id,
                            eos_id=resolve_tokenizer(cfg.data).eod_id, vocab_size=run.vocab_size,
                            context_length=cfg.data.seq_length)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]

    def measure():
        train = run_step(run, stage, batches, forward_only=True).loss  # a training-mode forward
        val = evaluate(run, stage, 32)["loss"]
        out = generate(run.model_chunks, prompts, sampler)
        return train, val, [r.completion_ids for r in out], [r.token_logprobs for r in out]

    noised = measure()
    run.embedding_noise.detach()
    clean = measure()
    return {"noised": noised, "clean": clean}


def test_no_embedding_noise_in_validation_or_sampling_forwards():
    from dist import run_distributed

    (res,) = run_distributed(_noise_free_eval_and_sampling, 1, timeout=400)
    (train_n, val_n, ids_n, logp_n), (train_c, val_c, ids_c, logp_c) = res["noised"], res["clean"]
    assert abs(train_n - train_c) > 1e-3  # the noise is live at this step
    assert val_n == val_c
    assert ids_n == ids_c and logp_n == logp_c

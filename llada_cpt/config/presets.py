"""Named model sizes (plain dicts of ``ModelConfig`` fields; no Megatron import), applied by the loader.

Dense presets follow the public Qwen3 configs; ``ling-mini-2.0`` follows the
public Ling-mini-2.0 (16B total / ~1.4B active) MoE config.  ``tiny`` and
``tiny-moe`` are debug sizes (a few M parameters) for CPU tests and the demo.
"""
from __future__ import annotations

from ..errors import ConfigError

_QWEN3_COMMON = dict(
    normalization="RMSNorm", norm_epsilon=1e-6, activation="swiglu", qk_layernorm=True,
    kv_channels=128, rotary_base=1_000_000.0, vocab_size=151936, max_position_embeddings=40960,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        num_layers=4, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, num_query_groups=2,
        qk_layernorm=True, max_position_embeddings=4096, normalization="RMSNorm", activation="swiglu",
    ),
    "tiny-moe": dict(
        num_layers=4, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, num_query_groups=2,
        qk_layernorm=True, max_position_embeddings=4096, num_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=96, moe_shared_expert_intermediate_size=96, moe_first_dense_layers=1,
    ),
    "qwen3-0.6b": dict(_QWEN3_COMMON, num_layers=28, hidden_size=1024, ffn_hidden_size=3072,
                       num_attention_heads=16, num_query_groups=8, untie_embeddings_and_output_weights=False),
    "qwen3-1.7b": dict(_QWEN3_COMMON, num_layers=28, hidden_size=2048, ffn_hidden_size=6144,
                       num_attention_heads=16, num_query_groups=8, untie_embeddings_and_output_weights=False),
    "qwen3-8b": dict(_QWEN3_COMMON, num_layers=36, hidden_size=4096, ffn_hidden_size=12288,
                     num_attention_heads=32, num_query_groups=8, untie_embeddings_and_output_weights=True),
    "ling-mini-2.0": dict(
        num_layers=20, hidden_size=2048, ffn_hidden_size=5120, num_attention_heads=16, num_query_groups=4,
        kv_channels=128, qk_layernorm=True, rotary_base=600_000.0, vocab_size=157184,
        max_position_embeddings=32768, normalization="RMSNorm", activation="swiglu",
        num_experts=256, moe_router_topk=8, moe_ffn_hidden_size=512, moe_shared_expert_intermediate_size=512,
        moe_first_dense_layers=1, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="none", moe_grouped_gemm=True,
    ),
}


def preset_dict(name: str) -> dict:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise ConfigError(f"unknown model preset `{name}`.{hint} Available: {', '.join(PRESETS)}")
    return dict(PRESETS[name])

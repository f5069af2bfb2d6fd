"""What each layer of a DeepSeek-V3 model costs per token, from its config alone (the planner's input,
moetron.plan): forward GEMM FLOPs (which FP8 may run, which stay BF16), attention-core FLOPs,
parameters (routed experts apart: expert parallelism shards them), token copies sent to experts, and
what the recompute policy runs again. The activations kept for the backward are measured, not
estimated (moetron.plan.memory fills them in).

FLOPs follow `params.training_flops_per_token` exactly (3 x forward; the sum over layers equals it,
tests/unit/test_plan.py holds that): forward GEMMs are 2 x the activated matmul parameters (norm
weights included, as there), attention 2 * S * heads * (qk_head + v_head) / 2 per layer.
"""
from __future__ import annotations

from moetron.models.common.costs import LayerCost
from moetron.models.common.mla import context_costs
from moetron.models.deepseek_v3.config import DeepSeekV3Config
from moetron.models.deepseek_v3.params import _attention, _block


def _mla(cfg: DeepSeekV3Config, S: int, recompute: bool) -> tuple[float, float, float]:
    """(projection FLOPs, attention FLOPs, recomputed FLOPs) per token."""
    H, N = cfg.hidden_size, cfg.num_attention_heads
    q_lat = cfg.q_lora_rank or 0
    up_proj = cfg.kv_lora_rank * N * (cfg.qk_nope_head_dim + cfg.v_head_dim) + q_lat * N * cfg.qk_head_dim
    attention = 2.0 * S * N * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    return 2.0 * (_attention(cfg) + 2 * H), attention, (2.0 * up_proj if recompute else 0.0)


def _decoder(cfg: DeepSeekV3Config, moe: bool, S: int, recompute: bool) -> LayerCost:
    block = _block(cfg, moe)
    proj, attn, again = _mla(cfg, S, recompute)
    H = cfg.hidden_size
    if not moe:
        return LayerCost("dense", proj + 2.0 * 3 * H * cfg.intermediate_size, 0.0, attn, block.total, 0, 0, again,
                         **context_costs(cfg))
    E, K, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    routed = 3 * E * H * I
    experts = 2.0 * 3 * H * (K * I + cfg.n_shared_experts * I)
    return LayerCost("moe", proj + experts, 2.0 * E * H, attn, block.total, routed, K, again,
                     routed_flops=2.0 * 3 * H * K * I, **context_costs(cfg))


def layer_costs(cfg: DeepSeekV3Config, seq_len: int, recompute: bool = False) -> list[LayerCost]:
    """Per-token costs of the embedding, each decoder layer, the head, and each MTP depth, in order."""
    H, V = cfg.hidden_size, cfg.vocab_size
    has_moe = cfg.n_routed_experts > 0
    head = 2.0 * V * H
    layers = [LayerCost("embedding", 0.0, 0.0, 0.0, V * H, 0, 0)]
    for i in range(cfg.num_hidden_layers):
        layers.append(_decoder(cfg, i >= cfg.first_k_dense_replace and has_moe, seq_len, recompute))
    head_params = H + (0 if cfg.tie_word_embeddings else V * H)
    layers.append(LayerCost("head", 2.0 * H, head, 0.0, head_params, 0, 0))  # final norm + head
    for _ in range(cfg.num_nextn_predict_layers):
        depth = _decoder(cfg, has_moe, seq_len, recompute)
        depth.kind = "mtp"
        depth.fp8_flops += 2.0 * (3 * H + 2 * H * H)  # hnorm, enorm, final norm; eh_proj
        depth.bf16_flops += head
        depth.params += 3 * H + 2 * H * H
        layers.append(depth)
    return layers

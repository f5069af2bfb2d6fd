"""What each layer of a DeepSeek-V3 model costs per token, from its config alone (the planner's input,
moetron.plan): forward GEMM FLOPs (which FP8 may run, which stay BF16), attention-core FLOPs,
parameters (routed experts apart: expert parallelism shards them), token copies sent to experts, and
the activations kept for the backward under a recompute policy and FP8 caching.

FLOPs follow `params.training_flops_per_token` exactly (3 x forward; the sum over layers equals it,
tests/unit/test_plan.py holds that): forward GEMMs are 2 x the activated matmul parameters (norm
weights included, as there), attention 2 * S * heads * (qk_head + v_head) / 2 per layer.

Activations, elements per token kept from a layer's forward to its backward (section 3.2.3 of the
report for what recomputation frees; 3.3.3 for what FP8 caching shrinks):
- MLA: the block's input (the norm's), the norm's output, both latents and their norms' outputs,
  q, k, v for the attention core, its output (the o_proj input, never FP8-cached);
- MoE: the norm's input and output, router scores (float32), the K dispatched copies, the
  experts' SwiGLU inputs (2I each) and outputs (I), the expert outputs the combine weighs, and the
  same for the shared experts;
- the head: the final norm and float32 logits.
`recompute` (the report's selective policy: RMSNorm, MLA up-projections, SwiGLU output) frees the
norms' outputs, q/k/v and the SwiGLU outputs; `fp8_cache` keeps GEMM inputs and SwiGLU inputs as
E4M3 tiles (1 byte plus a float32 scale per 128).
"""
from __future__ import annotations

from moetron.models.common.costs import BF16, FP8, LayerCost
from moetron.models.deepseek_v3.config import DeepSeekV3Config
from moetron.models.deepseek_v3.params import _attention, _block


def _mla(cfg: DeepSeekV3Config, S: int, recompute: bool) -> tuple[float, float, float, float]:
    """(projection FLOPs, attention FLOPs, activation bytes, recomputed FLOPs) per token."""
    H, N = cfg.hidden_size, cfg.num_attention_heads
    q_lat = cfg.q_lora_rank or 0
    kv_lat = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    qkv = N * (2 * cfg.qk_head_dim + cfg.v_head_dim)
    kept = H + kv_lat + q_lat + N * cfg.v_head_dim  # input, latents (norm inputs), attention output
    freed = H + cfg.kv_lora_rank + q_lat + qkv  # norms' outputs and q/k/v: recomputed
    up_proj = cfg.kv_lora_rank * N * (cfg.qk_nope_head_dim + cfg.v_head_dim) + q_lat * N * cfg.qk_head_dim
    attention = 2.0 * S * N * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    acts = BF16 * (kept + (0 if recompute else freed))
    return 2.0 * (_attention(cfg) + 2 * H), attention, acts, (2.0 * up_proj if recompute else 0.0)


def _ffn(cfg: DeepSeekV3Config, width: int, copies: int, recompute: bool, fp8_cache: bool) -> float:
    """Activation bytes per token of SwiGLU FFNs of `width` run on `copies` copies of a token: their
    inputs (H), SwiGLU inputs (2 x width), SwiGLU outputs (width, recomputed or kept) and outputs."""
    gemm_in = FP8 if fp8_cache else BF16
    swiglu_out = 0.0 if recompute else gemm_in * width
    return copies * (gemm_in * cfg.hidden_size + gemm_in * 2 * width + swiglu_out + BF16 * cfg.hidden_size)


def _decoder(cfg: DeepSeekV3Config, moe: bool, S: int, recompute: bool, fp8_cache: bool) -> LayerCost:
    block = _block(cfg, moe)
    proj, attn, acts, again = _mla(cfg, S, recompute)
    H = cfg.hidden_size
    norm_io = BF16 * H * (1 if recompute else 2)
    if not moe:
        I = cfg.intermediate_size
        return LayerCost("dense", proj + 2.0 * 3 * H * I, 0.0, attn, block.total, 0, 0,
                         acts + norm_io + _ffn(cfg, I, 1, recompute, fp8_cache), again)
    E, K, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    shared = cfg.n_shared_experts * I
    routed = 3 * E * H * I
    experts = 2.0 * 3 * H * (K * I + shared)
    acts += norm_io + 4.0 * E + _ffn(cfg, I, K, recompute, fp8_cache) + _ffn(cfg, shared, 1, recompute, fp8_cache)
    return LayerCost("moe", proj + experts, 2.0 * E * H, attn, block.total, routed, K, acts, again,
                     routed_flops=2.0 * 3 * H * K * I)


def layer_costs(cfg: DeepSeekV3Config, seq_len: int, recompute: bool = False,
                fp8_cache: bool = False) -> list[LayerCost]:
    """Per-token costs of the embedding, each decoder layer, the head, and each MTP depth, in order."""
    layers = _layer_costs(cfg, seq_len, recompute, fp8_cache)
    kept = layers if not recompute else _layer_costs(cfg, seq_len, False, fp8_cache)
    for layer, written in zip(layers, kept):
        layer.traffic_bytes = written.act_bytes  # recomputation writes them again
    return layers


def _layer_costs(cfg: DeepSeekV3Config, seq_len: int, recompute: bool, fp8_cache: bool) -> list[LayerCost]:
    H, V = cfg.hidden_size, cfg.vocab_size
    has_moe = cfg.n_routed_experts > 0
    head = 2.0 * V * H
    layers = [LayerCost("embedding", 0.0, 0.0, 0.0, V * H, 0, 0, 0.0)]
    for i in range(cfg.num_hidden_layers):
        layers.append(_decoder(cfg, i >= cfg.first_k_dense_replace and has_moe, seq_len, recompute, fp8_cache))
    head_params = H + (0 if cfg.tie_word_embeddings else V * H)
    logits = 4.0 * V + BF16 * H
    layers.append(LayerCost("head", 2.0 * H, head, 0.0, head_params, 0, 0, logits))  # final norm + head
    for _ in range(cfg.num_nextn_predict_layers):
        depth = _decoder(cfg, has_moe, seq_len, recompute, fp8_cache)
        depth.kind = "mtp"
        depth.fp8_flops += 2.0 * (3 * H + 2 * H * H)  # hnorm, enorm, final norm; eh_proj
        depth.bf16_flops += head
        depth.params += 3 * H + 2 * H * H
        depth.act_bytes += BF16 * 4 * H + logits
        layers.append(depth)
    return layers

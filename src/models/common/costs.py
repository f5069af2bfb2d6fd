"""Parameter counts, training FLOPs and the planner's per-layer costs of any decoder built from the
shared parts, read off the model's modules on the meta device (nothing is allocated), so a family
needs no formula of its own and the counts cannot drift from the modules.

- Parameters: every parameter once (a tied head counts once). Activated per token: the output
  head counted, the input embedding table not (a token reads one row of it), routed experts at K/E.
- Forward FLOPs per token: 2 x the activated matmul weights (linears, experts at K/E, the router;
  norms and biases are not matmuls) plus each attention's core, 2 x (mean keys seen) x heads x
  (qk dim + v dim) (causal: S / 2 keys, the convention of moetron.models.deepseek_v3.params; a
  sliding window sees fewer). Training: 3 x forward.
- Activations kept for the backward are not estimated here: the planner measures them
  (moetron.plan.memory) and fills `act_bytes` and the weight copies in.

Shape legend: H hidden, E routed experts, K experts per token, S sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moetron.models.common.experts import GroupedExperts
from moetron.models.common.moe import MoE
from moetron.models.common.router import TopKRouter

@dataclass
class CoreCost:
    """An attention core's per-token cost (each attention module says its own: `core_cost(S)`)."""

    flops: float  # forward FLOPs: 2 x mean keys seen x heads x (qk dim + v dim)
    recompute_flops: float = 0.0  # forward FLOPs the backward runs again (under the recompute policy)
    # context parallelism (moetron.models.common.context_parallel): BF16 bytes per token its gather
    # moves (MLA: latent + RoPE key; GQA: keys + values), and forward FLOPs per token of the whole
    # row that every cp rank runs (MLA's key/value up-projection; again in backward, then its backward)
    context_bytes: float = 0.0
    context_flops: float = 0.0
    context_mask: bool = False  # under cp it attends with a dense [S, T] mask (MLA's causal chunks need none)


@dataclass
class LayerCost:
    kind: str  # embedding | dense | moe | head | mtp
    fp8_flops: float  # forward GEMM FLOPs per token that FP8 may run
    bf16_flops: float  # forward GEMM FLOPs per token kept in BF16 (router, output head)
    attention_flops: float  # forward attention core per token (causal)
    params: int  # parameters, routed experts included
    routed_params: int  # routed experts' parameters (sharded over EP)
    routed_copies: int  # copies of each token sent to experts (top-K); 0 without MoE
    recompute_flops: float = 0.0  # forward FLOPs the backward runs again (recompute policy)
    routed_flops: float = 0.0  # the part of fp8_flops in routed experts (load imbalance slows it)
    # measured by moetron.plan.memory (`with_activations`):
    act_bytes: float = 0.0  # activations kept for the backward, bytes per token
    weight_copy_bytes: float = 0.0  # copies of (non-routed) weights kept for the backward, per micro-batch
    routed_copy_bytes: float = 0.0  # the same of the routed experts' weights, all experts (EP shards them)
    shared_copy_bytes: float = 0.0  # copies of (non-routed) weights made once per step for every micro-batch
    shared_routed_copy_bytes: float = 0.0  # the same of the routed experts' weights, all experts
    traffic_bytes: float = 0.0  # activations the layer writes, bytes per token (recomputed or not)
    context_bytes: float = 0.0  # per token: what context parallelism gathers (CoreCost)
    context_flops: float = 0.0  # per token of the whole row: what every cp rank runs (CoreCost)
    context_mask: bool = False  # under cp: a dense [S, T] mask per micro-batch (CoreCost)

    def forward_flops(self) -> float:
        return self.fp8_flops + self.bf16_flops + self.attention_flops


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _decoder_layer_cost(layer: nn.Module, seq_len: int, recompute: bool) -> LayerCost:
    """One decoder block of the shared parts (moetron.models.common.block.DecoderLayer)."""
    fp8_flops = bf16_flops = routed_flops = 0.0
    routed_params = copies = 0
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            fp8_flops += 2.0 * module.weight.numel()
    moe = layer.mlp if isinstance(layer.mlp, MoE) else None
    if moe is not None:
        router: TopKRouter = moe.gate
        E, K = router.settings.num_experts, router.settings.top_k
        experts: GroupedExperts = moe.experts
        routed_params = experts.gate_up_proj.numel() + experts.down_proj.numel()
        if experts.gate_up_proj_bias is not None:
            routed_params += experts.gate_up_proj_bias.numel() + experts.down_proj_bias.numel()
        routed_flops = 2.0 * (experts.gate_up_proj.numel() + experts.down_proj.numel()) * K / E
        fp8_flops += routed_flops
        bf16_flops += 2.0 * router.weight.numel()
        copies = K
    core = layer.self_attn.core_cost(seq_len, recompute)
    return LayerCost("moe" if moe is not None else "dense", fp8_flops, bf16_flops, core.flops, _numel(layer),
                     routed_params, copies, core.recompute_flops, routed_flops, context_bytes=core.context_bytes,
                     context_flops=core.context_flops, context_mask=core.context_mask)


def layer_costs(model: nn.Module, seq_len: int, recompute: bool = False) -> list[LayerCost]:
    """Per-token costs of the embedding, each decoder layer and the head of a DecoderLM (built on the
    meta device), in order; activations are the planner's measurement (moetron.plan.memory)."""
    H, V = model.embed_tokens.weight.shape[1], model.embed_tokens.weight.shape[0]
    tied = model.lm_head.weight is model.embed_tokens.weight
    costs = [LayerCost("embedding", 0.0, 0.0, 0.0, V * H, 0, 0)]
    costs += [_decoder_layer_cost(layer, seq_len, recompute) for layer in model.layers]
    head_params = _numel(model.norm) + (0 if tied else V * H)
    costs.append(LayerCost("head", 0.0, 2.0 * V * H, 0.0, head_params, 0, 0))
    return costs


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total parameters, parameters a token activates) of a DecoderLM: the output head counted and
    the input embedding table not; routed experts at K/E of their total."""
    total = _numel(model)
    unused = 0
    for module in model.modules():
        if isinstance(module, MoE):
            settings = module.gate.settings
            unused += _numel(module.experts) * (settings.num_experts - settings.top_k) // settings.num_experts
    tied = model.lm_head.weight is model.embed_tokens.weight
    return total, total - unused - (0 if tied else model.embed_tokens.weight.numel())


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """3 x the forward FLOPs of one token (forward, and the backward's two matmuls per forward one)."""
    return 3.0 * sum(c.forward_flops() for c in layer_costs(model, seq_len))

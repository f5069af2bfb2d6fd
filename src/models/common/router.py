"""Top-K routers of MoE layers behind one protocol: `router(x_BSH, valid_len) -> Routing` (the chosen
experts, their gates and the balance loss), a `tokens_per_expert` buffer counting the step's load,
and an `expert_bias` buffer (loss-free balancing; zeros and unused elsewhere). Expert parallelism,
the balance hook (`moe_step`) and the metrics see only this protocol.

Scoring (`RouterSettings.scores`), each family's as transformers computes it:
- `sigmoid` (DeepSeek-V3, Moonlight, Kimi K2; report eqs. 12-16): s = sigmoid(u^T e_i); the top-K is
  chosen on s + b (b: Loss-Free Balancing's bias, arXiv 2408.15664 eq. 3), optionally among the
  `topk_group` groups whose two best biased scores sum highest (groups become nodes under expert
  parallelism); gates are the raw s of the chosen, normalised over the K (`norm_topk_prob`), times
  `scaling_factor`. The bias steers the choice only and never gets a gradient.
- `softmax` (Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V2): s = softmax over all experts; top-K of s
  (DeepSeek-V2's `group_limited_greedy`: among the groups whose best score is highest); gates are
  the chosen s, renormalised over the K where `norm_topk_prob` (Mixtral's softmax of the top-K
  logits is exactly that), times `scaling_factor`.
- `softmax_topk` (GPT-OSS): logits u^T e_i + bias; top-K on the logits; gates softmax over the K.

Gating runs in float32 whatever the compute dtype, autocast included (DeepSeek-V3 report 3.3); the
gating GEMM keeps its inputs for the backward as they came, not their float32 copies
(`float32_linear`).

Balance terms (`balance_mode`, each alpha-weighted; `moetron.models.common.balance`): `seq_aux` the
sequence-wise loss (DeepSeek-V3 eqs. 17-20), `aux_loss` the micro-batch's (Switch), `global_aux_loss`
the same with the expert counts f_i summed over every data-parallel rank (dp x ep) of the micro-batch
before it is applied (the global-batch balance of Qiu et al. 2025, arXiv 2501.11873, which Qwen3
trains with; they also accumulate the counts over a step's micro-batches, which this does not;
`balance_group`, handed in by parallelize, is a group of those ranks of its own), `loss_free` the bias b (plus the
sequence-wise loss where seq_aux_alpha > 0). A router z-loss (ST-MoE, arXiv 2202.08906 eq. 5:
mean over tokens of logsumexp(logits)^2, weight `z_loss_alpha`) joins any of them.

Shape legend: B batch, S sequence, T tokens (B*S), H hidden, E routed experts, K experts per token,
G groups, V positions that count in the loads (valid_len).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetron.comm.counts import count_per_expert
from moetron.models.common.balance import (batch_balance_loss, global_balance_loss, router_z_loss,
                                           sequence_balance_loss)
from moetron.models.outputs import add_optional

SCORES = ("sigmoid", "softmax", "softmax_topk")
GROUP_SCORES = ("top2_sum", "max")
BALANCE_MODES = ("loss_free", "seq_aux", "aux_loss", "global_aux_loss", "none")


class _Float32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float())

    @staticmethod
    def backward(ctx, grad_TE):
        x_TH, weight_EH, bias_E = ctx.saved_tensors
        device = grad_TE.device.type
        # float32 GEMMs whatever autocast says (a backward may run under it: DualPipe's second thread
        # does). Only then is a context entered: leaving one at autocast nesting 0 clears the cast
        # cache the threads share (with float32 working weights, their BF16 copies are made again)
        off = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
        with off:  # as autograd differentiates F.linear of the float32 copies, cast back to each input's dtype
            grad_x = grad_TE.mm(weight_EH.float()).to(x_TH.dtype) if ctx.needs_input_grad[0] else None
            grad_w = grad_TE.t().mm(x_TH.float()).to(weight_EH.dtype) if ctx.needs_input_grad[1] else None
            grad_b = grad_TE.sum(0).to(bias_E.dtype) if bias_E is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def float32_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear in float32 whatever the inputs' dtypes (autocast off). The backward keeps x, weight
    and bias as they came, not their float32 copies (with BF16 activations, a copy of the hidden
    state per token per layer: 28 KB at DeepSeek-V3's width; with BF16 weights, one of the gate's
    weight per micro-batch); the backward recasts them and computes autograd's gradients of the
    float32 linear, bitwise (tests/unit/test_model.py). Shapes: x [T, H], weight [E, H]."""
    return _Float32Linear.apply(x, weight, bias)


@dataclass(frozen=True)
class RouterSettings:
    """How a family routes; an architecture's config says it (`router_settings()`)."""

    hidden_size: int
    num_experts: int
    top_k: int
    scores: str = "sigmoid"
    norm_topk_prob: bool = True
    scaling_factor: float = 1.0
    n_group: int = 1  # expert groups of group-limited routing (1: none)
    topk_group: int = 1  # groups a token may route to
    group_score: str = "top2_sum"  # a group's score: its two best (DeepSeek-V3) or its best (V2)
    linear_bias: bool = False  # the router's linear has a bias (GPT-OSS)
    # loss_free: the bias b (and the sequence-wise loss where seq_aux_alpha > 0); seq_aux: the
    # sequence-wise loss only; aux_loss: the batch-wise auxiliary loss; none
    balance_mode: str = "none"
    seq_aux_alpha: float = 0.0
    aux_loss_alpha: float = 0.0
    bias_update_speed: float = 0.0  # u in b_i += u * sign(mean_load - load_i)
    z_loss_alpha: float = 0.0  # weight of the router z-loss (0: none)

    @property
    def group_limited(self) -> bool:
        return self.n_group > 1 and self.topk_group < self.n_group


def per_layer_aux_alpha(router_aux_loss_coef: float, top_k: int, moe_layers: int) -> float:
    """The alpha of each MoE layer's balance loss that gives transformers' `router_aux_loss_coef`
    its meaning there: transformers adds coef x E x sum_i f_i P_i once, from f (tokens per expert,
    summing to K) and P pooled over the layers (K at perfect balance); moetron adds alpha x sum_i
    f'_i P_i per layer with f' = E f / K (1 at balance). Equal for equal layers: alpha = coef x K / L."""
    return router_aux_loss_coef * top_k / max(moe_layers, 1)


@dataclass
class Routing:
    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor
    balance_loss: Optional[torch.Tensor]  # alpha-weighted; None when the mode adds no loss


def limit_to_top_groups(choice_TE: torch.Tensor, n_group: int, topk_group: int,
                        group_score: str = "top2_sum") -> torch.Tensor:
    """Mask (to -inf) experts outside each token's `topk_group` best groups. A group scores the sum
    of its two highest entries of `choice_TE` (top2_sum) or its highest (max)."""
    T, E = choice_TE.shape
    grouped_TGE = choice_TE.view(T, n_group, E // n_group)
    if group_score == "max":
        group_score_TG = grouped_TGE.max(dim=-1).values
    else:
        group_score_TG = grouped_TGE.topk(2, dim=-1).values.sum(dim=-1)
    top_groups_TG = group_score_TG.topk(topk_group, dim=-1, sorted=False).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


class TopKRouter(nn.Module):
    """Chooses K experts per token and their gates; counts the step's load per expert.

    `expert_bias` is a buffer (never a parameter): `moe_step.apply_moe_step` updates it after each
    optimizer step from `tokens_per_expert`, which accumulates over all micro-batches of the step.
    """

    def __init__(self, settings: RouterSettings, layer_idx: int) -> None:
        super().__init__()
        self.settings = settings
        self.layer_idx = layer_idx
        E = settings.num_experts
        self.weight = nn.Parameter(torch.empty(E, settings.hidden_size))
        self.bias = nn.Parameter(torch.empty(E)) if settings.linear_bias else None
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.int64), persistent=False)
        self.balance_group = None  # the data-parallel ranks of global_aux_loss (None: this process alone)
        self.context_group = None  # context parallelism: the ranks holding the other tokens of my rows
        # routing replay (moetron.rl.replay): a list the chosen experts [B, S, K] of each forward are
        # appended to, and experts [B, S, K] the next forward uses instead of choosing
        self.recorded: Optional[list] = None
        self.replayed: Optional[torch.Tensor] = None

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.half()`...: the routing bias stays float32 whatever the model's dtype
        (a bias step of 0.001 is below bfloat16's resolution once |b| >= 0.5, and rounding it moves
        tokens to other experts); only its device follows."""
        bias = self.expert_bias
        module = super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32 and bias.dtype == torch.float32 and not bias.is_meta:
            self.expert_bias = bias.to(self.expert_bias.device)
        return module

    def forward(self, x_BSH: torch.Tensor, valid_len: Optional[int] = None,
                counted_BS: Optional[torch.Tensor] = None) -> Routing:
        """`valid_len`: only the first positions of each sequence count in the loads and the balance
        loss (an MTP depth k's last k positions hold wrapped-around tokens); `counted_BS`: only the
        True positions among them (packed samples: not a row's padding)."""
        cfg = self.settings
        B, S, H = x_BSH.shape
        V = S if valid_len is None else valid_len
        E, K = cfg.num_experts, cfg.top_k
        logits_TE = float32_linear(x_BSH.reshape(B * S, H), self.weight, self.bias)
        replayed_TK = None
        if self.replayed is not None:
            if tuple(self.replayed.shape) != (B, S, K):
                raise ValueError(f"routing replay: recorded experts of shape {tuple(self.replayed.shape)} for a "
                                 f"forward of {(B, S, K)} (batch, tokens, experts per token)")
            replayed_TK = self.replayed.reshape(B * S, K).to(logits_TE.device, torch.long)
        if cfg.scores == "softmax_topk":
            if replayed_TK is None:
                top_logits_TK, topk_idx_TK = logits_TE.topk(K, dim=-1)
            else:
                topk_idx_TK, top_logits_TK = replayed_TK, logits_TE.gather(1, replayed_TK)
            gate_TK = top_logits_TK.softmax(dim=-1)
            scores_TE = logits_TE.softmax(dim=-1)  # for the balance loss only
        elif replayed_TK is not None:  # the recorded experts; their gates from this forward's scores
            scores_TE = logits_TE.sigmoid() if cfg.scores == "sigmoid" else logits_TE.softmax(dim=-1)
            topk_idx_TK = replayed_TK
            gate_TK = scores_TE.gather(1, topk_idx_TK)
            if cfg.norm_topk_prob:
                gate_TK = gate_TK / (gate_TK.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            scores_TE = logits_TE.sigmoid() if cfg.scores == "sigmoid" else logits_TE.softmax(dim=-1)
            choice_TE = scores_TE.detach()
            if cfg.balance_mode == "loss_free":
                choice_TE = choice_TE + self.expert_bias
            if cfg.group_limited:
                choice_TE = limit_to_top_groups(choice_TE, cfg.n_group, cfg.topk_group, cfg.group_score)
            topk_idx_TK = choice_TE.topk(K, dim=-1, sorted=False).indices
            gate_TK = scores_TE.gather(1, topk_idx_TK)
            if cfg.norm_topk_prob:
                gate_TK = gate_TK / (gate_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.scaling_factor != 1.0:
            gate_TK = gate_TK * cfg.scaling_factor
        if self.recorded is not None:
            self.recorded.append(topk_idx_TK.view(B, S, K).detach())

        scores_BVE = scores_TE.view(B, S, E)[:, :V]
        chosen_BVK = topk_idx_TK.view(B, S, K)[:, :V]
        counted_BV = counted_BS[:, :V] if counted_BS is not None else None
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += count_per_expert(chosen_BVK if counted_BV is None else chosen_BVK[counted_BV], E)
        balance = self._balance_loss(scores_BVE, chosen_BVK, counted_BV)
        if cfg.z_loss_alpha > 0 and self.training and torch.is_grad_enabled():
            logits_BVE = logits_TE.view(B, S, E)[:, :V]
            balance = add_optional(balance, cfg.z_loss_alpha * router_z_loss(
                logits_BVE if counted_BV is None else logits_BVE[counted_BV], self.context_group))
        return Routing(topk_idx_TK, gate_TK, balance)

    def _balance_loss(self, scores_BVE, chosen_BVK, counted_BV=None) -> Optional[torch.Tensor]:
        cfg = self.settings
        if not (self.training and torch.is_grad_enabled()):
            return None
        E, K = cfg.num_experts, cfg.top_k
        if cfg.balance_mode in ("loss_free", "seq_aux") and cfg.seq_aux_alpha > 0:
            # f_i counts the top-K of the raw affinities, not the biased choice (eq. 18)
            raw_topk_BVK = scores_BVE.detach().topk(cfg.top_k, dim=-1, sorted=False).indices
            return cfg.seq_aux_alpha * sequence_balance_loss(scores_BVE, raw_topk_BVK, counted_BV, self.context_group)
        scores_TE, chosen_TK = scores_BVE.reshape(-1, E), chosen_BVK.reshape(-1, K)
        if counted_BV is not None:
            scores_TE, chosen_TK = scores_TE[counted_BV.reshape(-1)], chosen_TK[counted_BV.reshape(-1)]
        if cfg.balance_mode == "aux_loss" and cfg.aux_loss_alpha > 0:
            return cfg.aux_loss_alpha * batch_balance_loss(scores_TE, chosen_TK, self.context_group)
        if cfg.balance_mode == "global_aux_loss" and cfg.aux_loss_alpha > 0:
            counts_E, tokens = global_counts(chosen_TK, E, self.balance_group)
            return cfg.aux_loss_alpha * global_balance_loss(scores_TE, counts_E, tokens, K)
        return None


@torch.compiler.disable  # a collective: eager, between compiled regions
def global_counts(chosen_BVK: torch.Tensor, num_experts: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens choosing each expert [E], tokens []) over this micro-batch on every rank of `group`,
    float64 on the device (no wait on the host)."""
    tokens_1 = torch.full((1,), chosen_BVK[..., 0].numel(), dtype=torch.int64, device=chosen_BVK.device)
    local_E1 = torch.cat([count_per_expert(chosen_BVK, num_experts), tokens_1])
    summed_E1 = local_E1.double()
    if group is not None:
        dist.all_reduce(summed_E1, group=group)
    return summed_E1[:num_experts], summed_E1[num_experts]

"""The DeepSeekMoE router (report section 2.1.2, eqs. 12-16, and Loss-Free Balancing eq. 3).

s_{i,t} = sigmoid(u_t^T e_i) are the affinities. Top-K experts are chosen on s + b (b: the
per-expert bias of auxiliary-loss-free balancing), optionally among the `topk_group` groups whose
two best biased affinities sum highest (group-limited routing; groups become nodes under expert
parallelism). Gates are the *raw* affinities of the chosen experts, normalised over the K and
multiplied by the routed scaling factor: the bias steers routing only, and never gets a gradient.

Shape legend: B batch, S sequence, T tokens (B*S), H hidden, E routed experts, K experts per token,
G groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetron.comm.counts import count_per_expert
from moetron.models.deepseek_v3.balance import batch_balance_loss, sequence_balance_loss
from moetron.models.deepseek_v3.config import DeepSeekV3Config


@dataclass
class Routing:
    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor
    balance_loss: Optional[torch.Tensor]  # alpha-weighted; None when the mode adds no loss


def limit_to_top_groups(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Mask (to -inf) experts outside each token's `topk_group` best groups.

    A group scores the sum of its two highest entries of `choice_TE` (affinity + bias).
    """
    T, E = choice_TE.shape
    group_score_TG = choice_TE.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(dim=-1)
    top_groups_TG = group_score_TG.topk(topk_group, dim=-1, sorted=False).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


class TopKRouter(nn.Module):
    """Chooses K experts per token and their gates; counts the step's load per expert.

    `expert_bias` is a buffer (never a parameter): `moe_step.apply_moe_step` updates it after each
    optimizer step from `tokens_per_expert`, which accumulates over all micro-batches of the step.
    """

    def __init__(self, cfg: DeepSeekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.int64), persistent=False)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.half()`...: the routing bias stays float32 whatever the model's dtype
        (a bias step of 0.001 is below bfloat16's resolution once |b| >= 0.5, and rounding it moves
        tokens to other experts); only its device follows."""
        bias = self.expert_bias
        module = super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32 and bias.dtype == torch.float32 and not bias.is_meta:
            self.expert_bias = bias.to(self.expert_bias.device)
        return module

    def forward(self, x_BSH: torch.Tensor, valid_len: Optional[int] = None) -> Routing:
        """`valid_len`: only the first positions of each sequence count in the loads and the balance
        loss (an MTP depth k's last k positions hold wrapped-around tokens)."""
        cfg = self.cfg
        B, S, H = x_BSH.shape
        V = S if valid_len is None else valid_len
        # Gating stays in float32 whatever the compute dtype, autocast included (report section 3.3).
        with torch.autocast(x_BSH.device.type, enabled=False):
            scores_TE = F.linear(x_BSH.reshape(B * S, H).float(), self.weight.float()).sigmoid()
        choice_TE = scores_TE.detach() + self.expert_bias
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
            choice_TE = limit_to_top_groups(choice_TE, cfg.n_group, cfg.topk_group)
        topk_idx_TK = choice_TE.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        gate_TK = scores_TE.gather(1, topk_idx_TK)
        if cfg.norm_topk_prob:
            gate_TK = gate_TK / (gate_TK.sum(dim=-1, keepdim=True) + 1e-20)
        gate_TK = gate_TK * cfg.routed_scaling_factor

        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        scores_BVE = scores_TE.view(B, S, E)[:, :V]
        chosen_BVK = topk_idx_TK.view(B, S, K)[:, :V]
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += count_per_expert(chosen_BVK, E)
        return Routing(topk_idx_TK, gate_TK, self._balance_loss(scores_BVE, chosen_BVK))

    def _balance_loss(self, scores_BVE, chosen_BVK) -> Optional[torch.Tensor]:
        cfg = self.cfg
        if not (self.training and torch.is_grad_enabled()):
            return None
        if cfg.balance_mode in ("loss_free", "seq_aux") and cfg.seq_aux_alpha > 0:
            # f_i counts the top-K of the raw affinities, not the biased choice (eq. 18)
            raw_topk_BVK = scores_BVE.detach().topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
            return cfg.seq_aux_alpha * sequence_balance_loss(scores_BVE, raw_topk_BVK)
        if cfg.balance_mode == "aux_loss" and cfg.aux_loss_alpha > 0:
            E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
            return cfg.aux_loss_alpha * batch_balance_loss(scores_BVE.reshape(-1, E), chosen_BVK.reshape(-1, K))
        return None

"""The DeepSeek-V3 language model: embedding, decoder blocks, final norm, output head, MTP depths.

    model = DeepSeekV3(load_preset("tiny"))
    logits_BSV = model(input_ids_BS)                  # inference: MTP is skipped
    out = model(input_ids_BS, labels_BS)              # training: out.loss = L_main + L_MTP + balance

`labels_BS[:, i]` is the token after `input_ids_BS[:, i]` (IGNORE_INDEX to skip a position).
The total loss is L_main + (lambda / D) sum_k L^k (report eq. 25) + the layers' balance losses.
Parameter names follow transformers' DeepseekV3ForCausalLM without its `model.` prefix, so
`moetron.models.hf` maps checkpoints by a short rename table.

Shape legend: B batch, S sequence, H hidden, V vocabulary, R rotary dim.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetron.models.deepseek_v3.block import DecoderLayer
from moetron.models.deepseek_v3.config import DeepSeekV3Config
from moetron.models.deepseek_v3.experts import GroupedExperts
from moetron.models.deepseek_v3.layers import RMSNorm, rotary_cos_sin
from moetron.models.deepseek_v3.mtp import IGNORE_INDEX, MTPModule, mtp_depths
from moetron.models.deepseek_v3.router import TopKRouter


@dataclass
class LMOutput:
    loss: torch.Tensor  # what to back-propagate
    loss_lm: torch.Tensor  # next-token cross entropy
    loss_mtp: Optional[torch.Tensor]  # (lambda / D) * sum_k L^k, None without MTP
    loss_balance: Optional[torch.Tensor]  # sum of the layers' alpha-weighted balance losses
    logits_BSV: torch.Tensor


def cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over positions whose label is not IGNORE_INDEX (in float32)."""
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), ignore_index=IGNORE_INDEX)


def _add(total: Optional[torch.Tensor], term: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if term is None:
        return total
    return term if total is None else total + term


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, name), the same in every process."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


class DeepSeekV3(nn.Module):
    def __init__(self, cfg: DeepSeekV3Config) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, moe=i >= cfg.first_k_dense_replace and cfg.n_routed_experts > 0)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
        # lambda of the MTP loss; the trainer follows its schedule in tokens (0.3, then 0.1).
        self.mtp_loss_weight = cfg.mtp_loss_weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Normal(0, initializer_range) for every matrix (0.006 in the report, section 4.2); norms 1,
        router biases 0. Tensors still on the meta device (parts another rank holds) are skipped.

        With `seed`, each tensor draws from its own generator seeded by (seed, its name), and each
        routed expert by (seed, name, its global index): a rank that materialises only its pipeline
        stages or its expert shard gets exactly the weights of the whole model. Without, the global
        RNG is used in module order."""
        std = self.cfg.initializer_range

        def normal(name: str, tensor: torch.Tensor, first_expert: Optional[int] = None) -> None:
            if tensor.is_meta:
                return
            if seed is None:
                tensor.normal_(0.0, std)
            elif first_expert is None:
                tensor.normal_(0.0, std, generator=_generator(seed, name, tensor.device))
            else:
                for i, expert in enumerate(tensor):
                    expert.normal_(0.0, std, generator=_generator(seed, f"{name}[{first_expert + i}]", tensor.device))

        for prefix, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                normal(f"{prefix}.weight", module.weight)
            elif isinstance(module, GroupedExperts):
                normal(f"{prefix}.gate_up_proj", module.gate_up_proj, module.first_expert)
                normal(f"{prefix}.down_proj", module.down_proj, module.first_expert)
            elif isinstance(module, TopKRouter) and not module.weight.is_meta:
                normal(f"{prefix}.weight", module.weight)
                module.expert_bias.zero_()
                module.tokens_per_expert.zero_()
            elif isinstance(module, RMSNorm) and not module.weight.is_meta:
                module.weight.fill_(1.0)

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: Optional[torch.Tensor] = None):
        cfg = self.cfg
        S = input_ids_BS.shape[1]
        h_BSH = self.embed_tokens(input_ids_BS)
        cos_SR2, sin_SR2 = rotary_cos_sin(S, cfg.qk_rope_head_dim, cfg.rope_theta, h_BSH.device, h_BSH.dtype)
        balance = None
        for layer in self.layers:
            h_BSH, layer_balance = layer(h_BSH, cos_SR2, sin_SR2)
            balance = _add(balance, layer_balance)
        logits_BSV = self.lm_head(self.norm(h_BSH))
        if labels_BS is None:
            return logits_BSV

        loss_lm = cross_entropy(logits_BSV, labels_BS)
        loss_mtp = None
        for normed_BSH, labels_k_BS, depth_balance in mtp_depths(self.mtp, self.embed_tokens, h_BSH, input_ids_BS,
                                                                 labels_BS, cos_SR2, sin_SR2):
            loss_k = cross_entropy(self.lm_head(normed_BSH), labels_k_BS)
            loss_mtp = _add(loss_mtp, loss_k * (self.mtp_loss_weight / len(self.mtp)))
            balance = _add(balance, depth_balance)
        loss = _add(_add(loss_lm, loss_mtp), balance)
        return LMOutput(loss, loss_lm, loss_mtp, balance, logits_BSV)

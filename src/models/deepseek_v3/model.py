"""The DeepSeek-V3 language model: embedding, decoder blocks, final norm, output head, MTP depths.

    model = DeepSeekV3(load_preset("tiny"))
    logits_BSV = model(input_ids_BS)                  # inference: MTP is skipped
    out = model(input_ids_BS, labels_BS)              # training: out.loss = L_main + L_MTP + balance

`labels_BS[:, i]` is the token after `input_ids_BS[:, i]` (IGNORE_INDEX to skip a position).
The total loss is L_main + (lambda / D) sum_k L^k (report eq. 25) + the layers' balance losses;
lambda is `mtp_weight` (the trainer follows its schedule in tokens), else `cfg.mtp_loss_weight`.
`forward` is made of `embed`, `run_layers` and `loss_terms`, the pieces pipeline stages run
(`moetron.models.stages`), so the whole model and its stages share one path.
Parameter names follow transformers' DeepseekV3ForCausalLM without its `model.` prefix, so
`moetron.models.hf` maps checkpoints by a short rename table.

Shape legend: B batch, S sequence, H hidden, V vocabulary, R rotary dim.
"""
from __future__ import annotations

import zlib
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetron.models.common.experts import GroupedExperts
from moetron.models.common.norm import RMSNorm
from moetron.models.common.rope import rotary_cos_sin
from moetron.models.common.router import TopKRouter
from moetron.models.deepseek_v3.block import decoder_layer
from moetron.models.deepseek_v3.config import DeepSeekV3Config
from moetron.models.deepseek_v3.mtp import IGNORE_INDEX, MTPModule, mtp_depths
from moetron.models.outputs import LMOutput, LossTerms, add_optional


def cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over positions whose label is not IGNORE_INDEX (in float32)."""
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), ignore_index=IGNORE_INDEX)


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
            decoder_layer(cfg, i, moe=i >= cfg.first_k_dense_replace and cfg.n_routed_experts > 0)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
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

    # -- the pieces of the forward pass (pipeline stages run them too) ------------------------------
    def embedding_modules(self) -> list[nn.Module]:
        return [self.embed_tokens]

    def head_modules(self) -> list[nn.Module]:
        """What `loss_terms` reads: final norm, head, MTP depths and the embedding they use."""
        return [self.norm, self.lm_head, self.embed_tokens, self.mtp]

    def embed(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids_BS)

    def _rotary(self, h_BSH: torch.Tensor):
        cfg = self.cfg
        return rotary_cos_sin(h_BSH.shape[1], cfg.qk_rope_head_dim, cfg.rope_theta, h_BSH.device, h_BSH.dtype,
                              cfg.rope_scaling)

    def run_layers(self, h_BSH: torch.Tensor, layers: Iterable[nn.Module]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decoder blocks in order; returns the hidden state and the sum of their balance losses."""
        cos_SR2, sin_SR2 = self._rotary(h_BSH)
        balance = None
        for layer in layers:
            h_BSH, layer_balance = layer(h_BSH, cos_SR2, sin_SR2)
            balance = add_optional(balance, layer_balance)
        return h_BSH, balance

    def loss_terms(self, h_BSH: torch.Tensor, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor,
                   mtp_weight: Optional[float] = None) -> LossTerms:
        """After the last block: next-token loss, (lambda / D) sum_k L^k over the MTP depths (eqs.
        21-25), and the MTP blocks' balance losses."""
        lam = self.cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
        logits_BSV = self.lm_head(self.norm(h_BSH))
        loss_lm = cross_entropy(logits_BSV, labels_BS)
        cos_SR2, sin_SR2 = self._rotary(h_BSH)
        loss_mtp = balance = None
        for normed_BSH, labels_k_BS, depth_balance in mtp_depths(self.mtp, self.embed_tokens, h_BSH, input_ids_BS,
                                                                 labels_BS, cos_SR2, sin_SR2):
            loss_k = cross_entropy(self.lm_head(normed_BSH), labels_k_BS)
            loss_mtp = add_optional(loss_mtp, loss_k * (lam / len(self.mtp)))
            balance = add_optional(balance, depth_balance)
        return LossTerms(loss_lm, loss_mtp, balance, logits_BSV)

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: Optional[torch.Tensor] = None,
                mtp_weight: Optional[float] = None):
        """Logits [B, S, V] without labels (MTP skipped); with labels, an LMOutput."""
        h_BSH, balance = self.run_layers(self.embed(input_ids_BS), self.layers)
        if labels_BS is None:
            return self.lm_head(self.norm(h_BSH))
        terms = self.loss_terms(h_BSH, input_ids_BS, labels_BS, mtp_weight)
        balance = add_optional(balance, terms.balance)
        loss = add_optional(add_optional(terms.lm, terms.mtp), balance)
        return LMOutput(loss, terms.lm, terms.mtp, balance, terms.logits_BSV)

"""The DeepSeek-V3 language model: embedding, decoder blocks, final norm, output head, MTP depths.

    model = DeepSeekV3(load_preset("tiny"))
    logits_BSV = model(input_ids_BS)                  # inference: MTP is skipped
    out = model(input_ids_BS, labels_BS)              # training: out.loss = L_main + L_MTP + balance

`labels_BS[:, i]` is the token after `input_ids_BS[:, i]` (IGNORE_INDEX to skip a position).
The total loss is L_main + (lambda / D) sum_k L^k (report eq. 25) + the layers' balance losses;
lambda is `mtp_weight` (the trainer follows its schedule in tokens), else `cfg.mtp_loss_weight`.
The decoder is the shared one (moetron.models.common.decoder_lm): this class adds the MTP depths
to its loss tail. Parameter names follow transformers' DeepseekV3ForCausalLM without its `model.`
prefix, so `moetron.models.deepseek_v3.hf` maps checkpoints by a short rename table.

Shape legend: B batch, S sequence, H hidden, V vocabulary, R rotary dim.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetron.models.common.decoder_lm import DecoderLM
from moetron.models.common.packed import PackedSamples
from moetron.models.deepseek_v3.block import decoder_layer
from moetron.models.deepseek_v3.config import DeepSeekV3Config
from moetron.models.deepseek_v3.mtp import MTPModule, mtp_depths
from moetron.models.outputs import LossTerms, add_optional


class DeepSeekV3(DecoderLM):
    def __init__(self, cfg: DeepSeekV3Config) -> None:
        cfg.validate()
        layers = (decoder_layer(cfg, i, moe=i >= cfg.first_k_dense_replace and cfg.n_routed_experts > 0)
                  for i in range(cfg.num_hidden_layers))
        super().__init__(cfg, layers, cfg.qk_rope_head_dim)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
        self.init_weights()

    def head_modules(self) -> list[nn.Module]:
        """What `loss_terms` reads: final norm, head, MTP depths and the embedding they use."""
        return [self.norm, self.lm_head, self.embed_tokens, self.mtp]

    def loss_terms(self, h_BSH: torch.Tensor, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor,
                   mtp_weight: Optional[float] = None, samples: Optional[PackedSamples] = None,
                   loss_denominator: Optional[float] = None) -> LossTerms:
        """After the last block: next-token loss, (lambda / D) sum_k L^k over the MTP depths (eqs.
        21-25), and the MTP blocks' balance losses. `samples`: packed samples (a depth counts no
        target in another sample); `loss_denominator`: every depth's summed cross entropy is divided
        by it, the main loss's (eq. 24 divides L^k by the sequence's T, not by its own count)."""
        lam = self.cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
        terms = super().loss_terms(h_BSH, input_ids_BS, labels_BS, loss_denominator=loss_denominator)
        cos_SR2, sin_SR2 = self.rotary(h_BSH, samples)
        loss_mtp = balance = None
        for normed_BSH, labels_k_BS, depth_balance in mtp_depths(self.mtp, self.embed_tokens, h_BSH, input_ids_BS,
                                                                 labels_BS, cos_SR2, sin_SR2, samples):
            loss_k, _ = self.head_loss(normed_BSH, labels_k_BS, loss_denominator)
            loss_mtp = add_optional(loss_mtp, loss_k * (lam / len(self.mtp)))
            balance = add_optional(balance, depth_balance)
        return LossTerms(terms.lm, loss_mtp, balance, terms.logits_BSV)

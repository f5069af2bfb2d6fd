"""A decoder language model from the shared parts: token embedding, decoder layers
(moetron.models.common.block.DecoderLayer), final RMSNorm and output head. Every family here is one;
DeepSeek-V3 adds its Multi-Token Prediction depths to it.

`forward` is made of `embed`, `run_layers` and `loss_terms`, the pieces pipeline stages run
(moetron.models.stages), so the whole model and its stages share one path. Parameter names are
transformers' without the `model.` prefix (`embed_tokens`, `layers.{i}`, `norm`, `lm_head`), so a
family's Hugging Face adapter is mostly a rename table.

Shape legend: B batch, S sequence, H hidden, V vocabulary, R2 rotary pairs.
"""
from __future__ import annotations

import zlib
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetron.models.common.experts import GroupedExperts
from moetron.models.common.linear_cross_entropy import IGNORE_INDEX, OutputHead
from moetron.models.common.norm import RMSNorm
from moetron.models.common.packed import PackedSamples
from moetron.models.common.rope import rotary_cos_sin
from moetron.models.common.router import TopKRouter
from moetron.models.outputs import LMOutput, LossTerms, add_optional



def cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, denominator: Optional[float] = None
                  ) -> torch.Tensor:
    """Mean next-token cross entropy over positions whose label is not IGNORE_INDEX (in float32);
    with `denominator`, their sum divided by it (a loss normalised over a whole global batch)."""
    if denominator is None:
        return F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / denominator


def seeded_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, name), the same in every process."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


class DecoderLM(nn.Module):
    """`cfg` has vocab_size, hidden_size, rms_norm_eps, tie_word_embeddings, rope_theta,
    rope_scaling and initializer_range; `layers` are the decoder blocks in order; `rotary_dim` is
    the width each attention rotates. A subclass adds modules, then calls `init_weights()`."""

    def __init__(self, cfg, layers: Iterable[nn.Module], rotary_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.rotary_dim = rotary_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = OutputHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # a slot the memory converter sets (memory.chunked_loss): the head and its cross entropy run
        # a chunk of tokens at a time, keeping no logits (moetron.models.common.linear_cross_entropy)
        self.chunked_loss = False

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Normal(0, initializer_range) for every matrix, routed expert, router and attention sink;
        biases 0, norms 1, routing biases 0. Tensors still on the meta device (parts another rank
        holds) are skipped.

        With `seed`, each tensor draws from its own generator seeded by (seed, its name), and each
        routed expert by (seed, name, its global index): a rank that materialises only its pipeline
        stages or its expert shard gets exactly the weights of the whole model. Without, the global
        RNG is used in module order."""
        std = self.cfg.initializer_range

        def normal(name: str, tensor: Optional[torch.Tensor], first_expert: Optional[int] = None) -> None:
            if tensor is None or tensor.is_meta:
                return
            if seed is None:
                tensor.normal_(0.0, std)
            elif first_expert is None:
                tensor.normal_(0.0, std, generator=seeded_generator(seed, name, tensor.device))
            else:
                for i, expert in enumerate(tensor):
                    expert.normal_(0.0, std, generator=seeded_generator(seed, f"{name}[{first_expert + i}]",
                                                                        tensor.device))

        def zero(tensor: Optional[torch.Tensor]) -> None:
            if tensor is not None and not tensor.is_meta:
                tensor.zero_()

        for prefix, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                normal(f"{prefix}.weight", module.weight)
                zero(getattr(module, "bias", None))
            elif isinstance(module, GroupedExperts):
                normal(f"{prefix}.gate_up_proj", module.gate_up_proj, module.first_expert)
                normal(f"{prefix}.down_proj", module.down_proj, module.first_expert)
                zero(module.gate_up_proj_bias)
                zero(module.down_proj_bias)
            elif isinstance(module, TopKRouter):
                normal(f"{prefix}.weight", module.weight)
                zero(module.bias)
                zero(module.expert_bias)
                zero(module.tokens_per_expert)
            elif isinstance(module, RMSNorm) and not module.weight.is_meta:
                module.weight.fill_(1.0)
            if isinstance(getattr(module, "sinks", None), nn.Parameter):
                normal(f"{prefix}.sinks", module.sinks)

    # -- the pieces of the forward pass (pipeline stages run them too) ------------------------------
    def embedding_modules(self) -> list[nn.Module]:
        return [self.embed_tokens]

    def head_modules(self) -> list[nn.Module]:
        """What `loss_terms` reads: the final norm and the head."""
        return [self.norm, self.lm_head]

    def embed(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids_BS)

    def rotary(self, h_BSH: torch.Tensor, samples: Optional[PackedSamples] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [S, R2] of the positions of `h_BSH` (RoPE, or YaRN where rope_scaling says); of
        packed samples' positions, [B, 1, S, R2]."""
        cfg = self.cfg
        return rotary_cos_sin(h_BSH.shape[1], self.rotary_dim, cfg.rope_theta, h_BSH.device, h_BSH.dtype,
                              cfg.rope_scaling, samples.position_ids_BS if samples is not None else None)

    def run_layers(self, h_BSH: torch.Tensor, layers: Iterable[nn.Module], samples: Optional[PackedSamples] = None
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decoder blocks in order; returns the hidden state and the sum of their balance losses.
        `samples`: the rows hold packed samples, each attending only to itself."""
        cos_SR2, sin_SR2 = self.rotary(h_BSH, samples)
        balance = None
        for layer in layers:
            h_BSH, layer_balance = layer(h_BSH, cos_SR2, sin_SR2, samples=samples)
            balance = add_optional(balance, layer_balance)
        return h_BSH, balance

    def head_loss(self, normed_BSH: torch.Tensor, labels_BS: torch.Tensor, denominator: Optional[float] = None
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(cross entropy of the head's logits, the logits); under `chunked_loss` the logits are never
        whole, and None is returned for them. `denominator`: see `cross_entropy`."""
        if self.chunked_loss:  # through the module: its hooks run (ZeRO-1 lands the head's weight there)
            return self.lm_head(normed_BSH, labels_BS, denominator=denominator), None
        logits_BSV = self.lm_head(normed_BSH)
        return cross_entropy(logits_BSV, labels_BS, denominator), logits_BSV

    def loss_terms(self, h_BSH: torch.Tensor, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor,
                   samples: Optional[PackedSamples] = None, loss_denominator: Optional[float] = None) -> LossTerms:
        """After the last block: the next-token loss (`labels_BS` ignores each packed sample's last
        position already); `loss_denominator`: the counted targets' sum divided by it, not their mean
        (the trainer's normalisation over the global batch's counted tokens)."""
        loss, logits_BSV = self.head_loss(self.norm(h_BSH), labels_BS, loss_denominator)
        return LossTerms(loss, None, None, logits_BSV)

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: Optional[torch.Tensor] = None,
                samples: Optional[PackedSamples] = None, **loss_options):
        """Logits [B, S, V] without labels; with labels, an LMOutput (loss = LM + balance losses).
        `samples`: rows of packed samples (moetron.models.common.packed), each isolated."""
        h_BSH, balance = self.run_layers(self.embed(input_ids_BS), self.layers, samples)
        if labels_BS is None:
            return self.lm_head(self.norm(h_BSH))
        if samples is not None:
            loss_options["samples"] = samples
        terms = self.loss_terms(h_BSH, input_ids_BS, labels_BS, **loss_options)
        balance = add_optional(balance, terms.balance)
        loss = add_optional(add_optional(terms.lm, terms.mtp), balance)
        return LMOutput(loss, terms.lm, terms.mtp, balance, terms.logits_BSV)

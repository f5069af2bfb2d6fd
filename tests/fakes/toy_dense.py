"""A second architecture, registered from outside moetron: a small dense decoder built from the
shared blocks (moetron.models.common: the decoder LM, pre-norm layers, grouped-query attention,
SwiGLU MLPs), with nothing of its own but a config and a spec.

    moetron-train imports=[tests.fakes.toy_dense] hydra.searchpath=[file://tests/fakes/conf] model=toy_dense

It exists to show that the trainer names no model: everything it needs comes from `ToyDenseSpec`,
and what a family gets for free (counts, FLOPs, init, the pipeline pieces) from the shared blocks.
Shape legend: B batch, S sequence, H hidden.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from moetron.models import ModelSpec, register_model
from moetron.models.common import costs
from moetron.models.common.attention import AttentionSettings, GroupedQueryAttention
from moetron.models.common.block import DecoderLayer
from moetron.models.common.decoder_lm import DecoderLM
from moetron.models.common.mlp import MLP
from moetron.models.common.norm import RMSNorm


@dataclass
class ToyDenseConfig:
    arch: str = "toy_dense"
    vocab_size: int = 512
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    rope_theta: float = 10000.0
    rope_scaling: Optional[Any] = None
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    nan_at_forward: int = 0  # tests of non-finite steps: the n-th forward pass (1-based) yields NaN; 0 never


def decoder_layer(cfg: ToyDenseConfig, layer_idx: int) -> DecoderLayer:
    H, N = cfg.hidden_size, cfg.num_attention_heads
    attention = GroupedQueryAttention(AttentionSettings(hidden_size=H, num_heads=N, num_kv_heads=N, head_dim=H // N))
    return DecoderLayer(layer_idx, RMSNorm(H, cfg.rms_norm_eps), attention, RMSNorm(H, cfg.rms_norm_eps),
                        MLP(H, cfg.intermediate_size))


class ToyDense(DecoderLM):
    def __init__(self, cfg: ToyDenseConfig) -> None:
        super().__init__(cfg, (decoder_layer(cfg, i) for i in range(cfg.num_hidden_layers)),
                         cfg.hidden_size // cfg.num_attention_heads)
        self.forwards = 0
        self.init_weights()

    def embed(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        h_BSH = super().embed(input_ids_BS)
        return h_BSH * float("nan") if self.forwards == self.cfg.nan_at_forward else h_BSH


class ToyDenseSpec(ModelSpec):
    arch = "toy_dense"
    config_cls = ToyDenseConfig

    def build_module(self, cfg: ToyDenseConfig) -> nn.Module:
        return ToyDense(cfg)

    def flops_per_token(self, cfg: ToyDenseConfig, seq_len: int) -> float:
        return costs.training_flops_per_token(self.build(cfg, "meta"), seq_len)


register_model(ToyDenseSpec())

"""A second architecture, registered from outside moetron: a small dense decoder built from
DeepSeek-V3's layers (RMSNorm, SwiGLU MLP, rotary embedding) with plain causal multi-head attention.

    moetron-train imports=[tests.fakes.toy_dense] hydra.searchpath=[file://tests/fakes/conf] model=toy_dense

It exists to show that the trainer names no model: everything it needs comes from `ToyDenseSpec`.
Shape legend: B batch, S sequence, H hidden, N heads, D head dim, V vocabulary.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetron.models import ModelSpec, register_model
from moetron.models.common.mlp import MLP
from moetron.models.common.norm import RMSNorm
from moetron.models.common.rope import apply_rotary, rotary_cos_sin
from moetron.models.outputs import LMOutput, LossTerms


@dataclass
class ToyDenseConfig:
    arch: str = "toy_dense"
    vocab_size: int = 512
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    nan_at_forward: int = 0  # tests of non-finite steps: the n-th forward pass (1-based) yields NaN; 0 never


class Attention(nn.Module):
    def __init__(self, cfg: ToyDenseConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x_BSH, cos, sin):
        B, S, H = x_BSH.shape
        q_BNSD, k_BNSD, v_BNSD = self.qkv(x_BSH).view(B, S, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q_BNSD, k_BNSD = (apply_rotary(t, cos, sin, interleave=False) for t in (q_BNSD, k_BNSD))
        y_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD, is_causal=True)
        return self.out(y_BNSD.transpose(1, 2).reshape(B, S, H))


class Block(nn.Module):
    def __init__(self, cfg: ToyDenseConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.hidden_size), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.hidden_size), MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BSH, cos, sin):
        x_BSH = x_BSH + self.attn(self.attn_norm(x_BSH), cos, sin)
        return x_BSH + self.mlp(self.mlp_norm(x_BSH))


class ToyDense(nn.Module):
    def __init__(self, cfg: ToyDenseConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.forwards = 0
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Each matrix from a generator seeded by (seed, its name): a pipeline rank that holds some
        layers gets exactly the whole model's weights. Tensors still on meta are skipped."""
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.ndim == 1:
                p.fill_(1.0)
                continue
            g = None if seed is None else torch.Generator(p.device).manual_seed(seed + zlib.crc32(name.encode()))
            p.normal_(0.0, self.cfg.initializer_range, generator=g)

    # the pieces of the forward pass, as moetron.models.stages asks
    def embedding_modules(self):
        return [self.embed_tokens]

    def head_modules(self):
        return [self.norm, self.lm_head]

    def embed(self, input_ids_BS):
        self.forwards += 1
        h_BSH = self.embed_tokens(input_ids_BS)
        return h_BSH * float("nan") if self.forwards == self.cfg.nan_at_forward else h_BSH

    def run_layers(self, h_BSH, layers: Iterable[nn.Module]):
        head_dim = self.cfg.hidden_size // self.cfg.num_attention_heads
        cos, sin = rotary_cos_sin(h_BSH.shape[1], head_dim, self.cfg.rope_theta, h_BSH.device, h_BSH.dtype)
        for layer in layers:
            h_BSH = layer(h_BSH, cos, sin)
        return h_BSH, None

    def loss_terms(self, h_BSH, input_ids_BS, labels_BS) -> LossTerms:
        logits_BSV = self.lm_head(self.norm(h_BSH))
        loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten())
        return LossTerms(loss, logits_BSV=logits_BSV)

    def forward(self, input_ids_BS, labels_BS=None):
        h_BSH, _ = self.run_layers(self.embed(input_ids_BS), self.layers)
        if labels_BS is None:
            return self.lm_head(self.norm(h_BSH))
        terms = self.loss_terms(h_BSH, input_ids_BS, labels_BS)
        return LMOutput(terms.total, terms.lm, None, None, terms.logits_BSV)


class ToyDenseSpec(ModelSpec):
    arch = "toy_dense"
    config_cls = ToyDenseConfig

    def build_module(self, cfg: ToyDenseConfig) -> nn.Module:
        return ToyDense(cfg)

    def flops_per_token(self, cfg: ToyDenseConfig, seq_len: int) -> float:
        """3 x forward: 2 x matmul parameters (embedding lookup excluded) + causal attention."""
        H, L = cfg.hidden_size, cfg.num_hidden_layers
        matmul = L * (4 * H * H + 3 * H * cfg.intermediate_size) + cfg.vocab_size * H
        return 3.0 * (2.0 * matmul + L * 2 * seq_len * H)


register_model(ToyDenseSpec())

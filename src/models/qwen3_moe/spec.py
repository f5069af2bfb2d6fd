"""Qwen3-MoE's model spec: an MoE decoder of the shared parts (moetron.models.common.moe_spec)."""
from __future__ import annotations

from torch import nn

from moetron.models.common.moe_spec import MoEDecoderSpec
from moetron.models.qwen3_moe.config import Qwen3MoeConfig
from moetron.models.qwen3_moe.hf import Qwen3MoeHF
from moetron.models.qwen3_moe.model import Qwen3Moe


class Qwen3MoeSpec(MoEDecoderSpec):
    arch = "qwen3_moe"
    config_cls = Qwen3MoeConfig
    run_settings = ("router_aux_loss_coef", "seq_aux_alpha", "bias_update_speed", "router_z_loss_coef", "init_from")
    experts_key = "model.num_experts"
    hf = Qwen3MoeHF()

    def build_module(self, cfg: Qwen3MoeConfig) -> nn.Module:
        return Qwen3Moe(cfg)

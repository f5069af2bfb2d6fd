"""Mixtral's model spec: an MoE decoder of the shared parts (moetron.models.common.moe_spec)."""
from __future__ import annotations

from torch import nn

from moetron.models.common.moe_spec import MoEDecoderSpec
from moetron.models.mixtral.config import MixtralConfig
from moetron.models.mixtral.hf import MixtralHF
from moetron.models.mixtral.model import Mixtral


class MixtralSpec(MoEDecoderSpec):
    arch = "mixtral"
    config_cls = MixtralConfig
    run_settings = ("router_aux_loss_coef", "seq_aux_alpha", "bias_update_speed", "router_z_loss_coef", "init_from")
    experts_key = "model.num_local_experts"
    hf = MixtralHF()

    def build_module(self, cfg: MixtralConfig) -> nn.Module:
        return Mixtral(cfg)

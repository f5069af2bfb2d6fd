"""DeepSeek-V2's model spec: an MoE decoder of the shared parts (moetron.models.common.moe_spec)."""
from __future__ import annotations

from torch import nn

from moetron.models.common.moe_spec import MoEDecoderSpec
from moetron.models.deepseek_v2.config import DeepSeekV2Config
from moetron.models.deepseek_v2.hf import DeepSeekV2HF
from moetron.models.deepseek_v2.model import DeepSeekV2


class DeepSeekV2Spec(MoEDecoderSpec):
    arch = "deepseek_v2"
    config_cls = DeepSeekV2Config
    run_settings = ("aux_loss_alpha", "seq_aux", "bias_update_speed", "router_z_loss_coef", "init_from")
    hf = DeepSeekV2HF()
    groups_span = "devices"  # device-limited routing (section 2.2.2), not node-limited

    def build_module(self, cfg: DeepSeekV2Config) -> nn.Module:
        return DeepSeekV2(cfg)

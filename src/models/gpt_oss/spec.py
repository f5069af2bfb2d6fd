"""GPT-OSS's model spec: an MoE decoder of the shared parts (moetron.models.common.moe_spec)."""
from __future__ import annotations

from torch import nn

from moetron.models.common.moe_spec import MoEDecoderSpec
from moetron.models.gpt_oss.config import GptOssConfig
from moetron.models.gpt_oss.hf import GptOssHF
from moetron.models.gpt_oss.model import GptOss


class GptOssSpec(MoEDecoderSpec):
    arch = "gpt_oss"
    config_cls = GptOssConfig
    run_settings = ("router_aux_loss_coef", "seq_aux_alpha", "bias_update_speed", "router_z_loss_coef", "init_from")
    experts_key = "model.num_local_experts"
    hf = GptOssHF()

    def build_module(self, cfg: GptOssConfig) -> nn.Module:
        return GptOss(cfg)

"""DeepSeek-V3's model spec: what the trainer asks of the architecture (moetron.models.spec)."""
from __future__ import annotations

from torch import nn

from moetron.models.common.moe_spec import MoEDecoderSpec
from moetron.models.deepseek_v3.config import DeepSeekV3Config
from moetron.models.deepseek_v3.layer_costs import layer_costs
from moetron.models.deepseek_v3.model import DeepSeekV3
from moetron.models.deepseek_v3.params import count_parameters, training_flops_per_token
from moetron.models.deepseek_v3.hf import ADAPTER
from moetron.models.spec import piecewise

# the report's schedules in tokens, where train.* leaves them unset (None): lambda from the model
# config (0.3) then 0.1 after 10T tokens; the bias speed u (0.001) then 0 after 14.3T
MTP_WEIGHT_LATER = (10.0e12, 0.1)
BIAS_SPEED_LATER = (14.3e12, 0.0)


class DeepSeekV3Spec(MoEDecoderSpec):
    arch = "deepseek_v3"
    config_cls = DeepSeekV3Config
    run_settings = ("mtp_loss_weight", "bias_update_speed", "seq_aux_alpha", "aux_loss_alpha", "router_z_loss_coef", "init_from")
    moved_keys = {"recompute_norm": "recompute.norm", "recompute_mla_up_proj": "recompute.mla_up_proj",
                  "recompute_swiglu": "recompute.swiglu"}
    hf = ADAPTER

    def build_module(self, cfg: DeepSeekV3Config) -> nn.Module:
        return DeepSeekV3(cfg)

    def loss_options(self, cfg: DeepSeekV3Config, train_cfg, tokens_seen: int) -> dict:
        """lambda of the MTP loss after `tokens_seen` tokens (`train.mtp_weight_schedule`)."""
        schedule = train_cfg.mtp_weight_schedule or [[0, cfg.mtp_loss_weight], list(MTP_WEIGHT_LATER)]
        return {"mtp_weight": piecewise(schedule, tokens_seen)}

    def loss_metrics(self, cfg: DeepSeekV3Config) -> dict[str, str]:
        names = super().loss_metrics(cfg)
        if cfg.num_nextn_predict_layers:
            names["mtp"] = "loss/mtp"
        return names

    def bias_update_schedule(self, cfg: DeepSeekV3Config, train_cfg) -> list:
        """The speed u (0.001), then 0 after 14.3T tokens, unless `train.bias_update_schedule` says."""
        return train_cfg.bias_update_schedule or [[0, cfg.bias_update_speed], list(BIAS_SPEED_LATER)]

    def flops_per_token(self, cfg: DeepSeekV3Config, seq_len: int) -> float:
        return training_flops_per_token(cfg, seq_len)

    def parameter_counts(self, cfg: DeepSeekV3Config) -> tuple[int, int]:
        """Total (671.0B for v3_671b) and activated per token, the output head counted and the
        input embedding table not, which a token reads one row of (36.63B; the report's 37B)."""
        count = count_parameters(cfg)
        return count.total, count.activated_per_token

    def layer_costs(self, cfg: DeepSeekV3Config, seq_len: int, recompute: bool) -> list:
        return layer_costs(cfg, seq_len, recompute)

"""DeepSeek-V3's model spec: what the trainer asks of the architecture (moetron.models.spec)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from moetron.models.deepseek_v3.config import DeepSeekV3Config
from moetron.models.deepseek_v3.model import DeepSeekV3
from moetron.models.deepseek_v3.moe_step import apply_moe_step, local_moe_stats
from moetron.models.deepseek_v3.parallelize import parallelize
from moetron.models.deepseek_v3.layer_costs import layer_costs
from moetron.models.deepseek_v3.params import count_parameters, training_flops_per_token
from moetron.models.hf import load_hf_folder, save_hf_folder
from moetron.models.spec import ModelSpec, Parallelized, piecewise
from moetron.precision.convert import FP8Recipe

BALANCE_METRIC = {"loss_free": "loss/seq_aux", "seq_aux": "loss/seq_aux", "aux_loss": "loss/aux"}

# the report's schedules in tokens, where train.* leaves them unset (None): lambda from the model
# config (0.3) then 0.1 after 10T tokens; the bias speed u (0.001) then 0 after 14.3T
MTP_WEIGHT_LATER = (10.0e12, 0.1)
BIAS_SPEED_LATER = (14.3e12, 0.0)


class DeepSeekV3Spec(ModelSpec):
    arch = "deepseek_v3"
    config_cls = DeepSeekV3Config
    run_settings = ("mtp_loss_weight", "bias_update_speed", "seq_aux_alpha", "aux_loss_alpha", "init_from")
    moved_keys = {"recompute_norm": "recompute.norm", "recompute_mla_up_proj": "recompute.mla_up_proj",
                  "recompute_swiglu": "recompute.swiglu"}

    def build_module(self, cfg: DeepSeekV3Config) -> nn.Module:
        return DeepSeekV3(cfg)

    def problems(self, cfg: DeepSeekV3Config, dims, topology, seq_len: int) -> list[str]:
        out = super().problems(cfg, dims, topology, seq_len)
        if cfg.n_routed_experts % dims.ep:
            out.append(f"model.n_routed_experts={cfg.n_routed_experts} is not divisible by parallel.ep={dims.ep}: "
                       "choose an ep that divides it")
        if cfg.init_from and not (Path(cfg.init_from) / "config.json").is_file():
            out.append(f"model.init_from={cfg.init_from}: no Hugging Face folder there (config.json is missing); "
                       "moetron-export RUN_DIR --hf OUT_DIR writes one")
        ep_nodes = dims.ep_nodes(topology)
        if ep_nodes > 1 and cfg.topk_group < cfg.n_group and cfg.n_group != ep_nodes:
            out.append(f"node-limited routing maps expert groups to nodes: the EP group spans {ep_nodes} nodes, "
                       f"so set model.n_group={ep_nodes} (model.topk_group = M, the most nodes per token)")
        return out

    def parallelize(self, model: nn.Module, groups, dispatcher: str, defer_weights: bool,
                    fp8: Optional[FP8Recipe] = None, recompute: Optional[dict] = None) -> Parallelized:
        return parallelize(model, groups, dispatcher, defer_weights, fp8, recompute)

    def loss_options(self, cfg: DeepSeekV3Config, train_cfg, tokens_seen: int) -> dict:
        """lambda of the MTP loss after `tokens_seen` tokens (`train.mtp_weight_schedule`)."""
        schedule = train_cfg.mtp_weight_schedule or [[0, cfg.mtp_loss_weight], list(MTP_WEIGHT_LATER)]
        return {"mtp_weight": piecewise(schedule, tokens_seen)}

    def loss_metrics(self, cfg: DeepSeekV3Config) -> dict[str, str]:
        names = super().loss_metrics(cfg)
        if cfg.num_nextn_predict_layers:
            names["mtp"] = "loss/mtp"
        if cfg.balance_mode in BALANCE_METRIC:
            names["balance"] = BALANCE_METRIC[cfg.balance_mode]
        return names

    def step_stats(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        return local_moe_stats(model, device)

    def after_step(self, model: nn.Module, summed: dict, train_cfg, tokens_seen: int, update: bool = True) -> dict:
        """The loss-free bias update from the step's loads (speed u, then 0 after 14.3T tokens), and
        the MoE metrics: MaxVio per layer and mean, tokens per expert, each expert's bias and their
        mean |bias|."""
        schedule = train_cfg.bias_update_schedule or [[0, model.cfg.bias_update_speed], list(BIAS_SPEED_LATER)]
        speed = piecewise(schedule, tokens_seen) if update else 0.0  # a skipped step moves no bias
        moe = apply_moe_step(model, summed, speed)
        if not moe.maxvio:
            return {}
        metrics = {"moe/maxvio_batch": moe.maxvio_mean}
        for layer, value in moe.maxvio.items():
            metrics[f"moe/maxvio_batch/layer_{layer}"] = value
            metrics[f"moe/load/layer_{layer}"] = moe.tokens_per_expert[layer]
            metrics[f"moe/bias_abs_mean/layer_{layer}"] = moe.bias_abs_mean[layer]
            metrics[f"moe/bias/layer_{layer}"] = moe.bias[layer]
        return metrics

    def save_hf(self, model: nn.Module, out_dir) -> None:
        save_hf_folder(model, out_dir)

    def load_hf(self, cfg: DeepSeekV3Config, folder) -> dict:
        return load_hf_folder(cfg, folder)

    def flops_per_token(self, cfg: DeepSeekV3Config, seq_len: int) -> float:
        return training_flops_per_token(cfg, seq_len)

    def parameter_counts(self, cfg: DeepSeekV3Config) -> tuple[int, int]:
        """Total (671.0B for v3_671b) and activated per token, the output head counted and the
        input embedding table not, which a token reads one row of (36.63B; the report's 37B)."""
        count = count_parameters(cfg)
        return count.total, count.activated_per_token

    def layer_costs(self, cfg: DeepSeekV3Config, seq_len: int, recompute: bool, fp8_cache: bool) -> list:
        return layer_costs(cfg, seq_len, recompute, fp8_cache)

"""What the trainer asks of any MoE decoder built from the shared parts (moetron.models.spec):
expert parallelism, FP8 and recomputation through `parallelize`, the routers' step statistics and
loss-free bias update (`moe_step`), MoE metrics, and the checks of a layout against the routers.

An architecture's spec subclasses `MoEDecoderSpec`; its config has `router_settings()` (a
moetron.models.common.router.RouterSettings), the routers' `balance_mode` naming the loss logged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from moetron.models.common import costs
from moetron.models.common.moe_step import apply_moe_step, local_moe_stats
from moetron.models.common.parallelize import parallelize
from moetron.models.spec import ModelSpec, Parallelized, piecewise
from moetron.precision.convert import FP8Recipe

BALANCE_METRIC = {"loss_free": "loss/seq_aux", "seq_aux": "loss/seq_aux", "aux_loss": "loss/aux",
                  "global_aux_loss": "loss/aux"}  # a router z-loss joins whichever is logged


class MoEDecoderSpec(ModelSpec):
    """The spec of a decoder whose MoE layers are moetron.models.common.moe.MoE."""

    # the config keys of the routed expert count, the expert groups and the groups a token may
    # reach, for messages
    experts_key, groups_key, group_limit_key = "model.n_routed_experts", "model.n_group", "model.topk_group"
    # what a group of group-limited routing stands for: "nodes" (DeepSeek-V3's node-limited
    # routing: the groups must be the EP group's nodes) or "devices" (DeepSeek-V2's device-limited
    # routing: any number of groups, checked against no node count)
    groups_span = "nodes"

    def routed_experts(self, cfg) -> int:
        return cfg.router_settings().num_experts

    def routing_groups(self, cfg) -> tuple[int, int]:
        settings = cfg.router_settings()
        return (settings.n_group, settings.topk_group) if settings.group_limited else (0, 0)

    def problems(self, cfg, dims, topology, seq_len: int) -> list[str]:
        out = super().problems(cfg, dims, topology, seq_len)
        experts = self.routed_experts(cfg)
        if experts % dims.expert_ranks:
            group = f"parallel.ep={dims.ep}" if dims.cp == 1 else \
                f"the EP group's parallel.ep x parallel.cp = {dims.expert_ranks} ranks"
            out.append(f"{self.experts_key}={experts} is not divisible by {group}: choose an ep that divides it")
        init_from = getattr(cfg, "init_from", None)
        if init_from and not (Path(init_from) / "config.json").is_file():
            out.append(f"model.init_from={init_from}: no Hugging Face folder there (config.json is missing); "
                       "moetron-export RUN_DIR --hf OUT_DIR writes one")
        routing = self.ep_nodes_problem(cfg, dims.ep_nodes(topology))
        return out + ([routing] if routing else [])

    def ep_nodes_problem(self, cfg, ep_nodes: int) -> Optional[str]:
        """Node-limited routing maps expert groups to nodes: an EP group across nodes spans as many
        nodes as the routing has groups (the planner skips layouts this refuses)."""
        n_group, _ = self.routing_groups(cfg)
        if self.groups_span == "nodes" and ep_nodes > 1 and n_group and n_group != ep_nodes:
            return (f"node-limited routing maps expert groups to nodes: the EP group spans {ep_nodes} nodes, "
                    f"so set {self.groups_key}={ep_nodes} ({self.group_limit_key} = M, the most nodes per token)")
        return None

    # -- counts and costs, read off the modules on the meta device (moetron.models.common.costs) -----
    def parameter_counts(self, cfg) -> tuple[int, int]:
        return costs.parameter_counts(self.build(cfg, "meta"))

    def flops_per_token(self, cfg, seq_len: int) -> float:
        return costs.training_flops_per_token(self.build(cfg, "meta"), seq_len)

    def layer_costs(self, cfg, seq_len: int, recompute: bool) -> list:
        return costs.layer_costs(self.build(cfg, "meta"), seq_len, recompute)

    def parallelize(self, model: nn.Module, groups, dispatcher: str, defer_weights: bool,
                    fp8: Optional[FP8Recipe] = None, recompute: Optional[dict] = None,
                    memory: Optional[dict] = None) -> Parallelized:
        return parallelize(model, groups, dispatcher, defer_weights, fp8, recompute, memory)

    def loss_metrics(self, cfg) -> dict[str, str]:
        names = super().loss_metrics(cfg)
        settings = cfg.router_settings()
        alpha = settings.seq_aux_alpha if settings.balance_mode in ("loss_free", "seq_aux") else settings.aux_loss_alpha
        if settings.balance_mode in BALANCE_METRIC and alpha > 0:
            names["balance"] = BALANCE_METRIC[settings.balance_mode]
        elif settings.z_loss_alpha > 0:
            names["balance"] = "loss/z"
        return names

    def bias_update_schedule(self, cfg, train_cfg) -> list:
        """[[from_tokens, speed], ...] of the loss-free bias update (`train.bias_update_schedule`,
        else the config's speed throughout)."""
        return train_cfg.bias_update_schedule or [[0, cfg.router_settings().bias_update_speed]]

    def step_stats(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        return local_moe_stats(model, device)

    def after_step(self, model: nn.Module, summed: dict, train_cfg, tokens_seen: int, update: bool = True) -> dict:
        """The loss-free bias update from the step's loads, and the MoE metrics: MaxVio per layer and
        mean, tokens per expert, each expert's bias and their mean |bias|."""
        speed = piecewise(self.bias_update_schedule(model.cfg, train_cfg), tokens_seen) if update else 0.0
        moe = apply_moe_step(model, summed, speed)  # a skipped step (update False) moves no bias
        if not moe.maxvio:
            return {}
        metrics = {"moe/maxvio_batch": moe.maxvio_mean}
        for layer, value in moe.maxvio.items():
            metrics[f"moe/maxvio_batch/layer_{layer}"] = value
            metrics[f"moe/load/layer_{layer}"] = moe.tokens_per_expert[layer]
            metrics[f"moe/bias_abs_mean/layer_{layer}"] = moe.bias_abs_mean[layer]
            metrics[f"moe/bias/layer_{layer}"] = moe.bias[layer]
        return metrics

"""A model spec: everything the trainer needs to know about an architecture, in one place.

The trainer names no model. It looks up the spec of `model.arch` in the registry
(`moetron.models.registry`) and asks it for the config class, the model, how to parallelize it,
how to cut it into pipeline stages, the loss options of a step, the statistics to reduce after a
step and what to do with them, and the model FLOPs per token. A new architecture subclasses
`ModelSpec`, overrides what differs, and calls `register_model(MySpec())`; `moetron-train
imports=[my_package.my_model] model.arch=my_arch` imports it before the model is built.

The defaults fit a decoder that exposes the pieces of its forward pass
(`moetron.models.stages`): no expert parallelism, an even pipeline split, no step hooks.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from moetron.models.stages import PipelineParts, pipeline_split
from moetron.core.convert import apply_converters
from moetron.core.weight_grads import WeightGradStore
from moetron.parallel.memory import MemorySwitches
from moetron.parallel.recompute import SelectiveRecompute
from moetron.parallel.weight_grads import WeightGradDeferral
from moetron.precision.convert import FP8Conversion, FP8Recipe


@dataclass
class Parallelized:
    """What `parallelize` made, handed to the trainer (nothing is attached to the model)."""

    expert_params: list = field(default_factory=list)  # sharded over EP: gradients reduce over expert-DP
    traffic: Any = None  # a moetron.comm.traffic.TrafficCounter of the token exchanges, or None
    weight_grad_store: Optional[WeightGradStore] = None  # where B actions queue weight gradients for W
    dispatcher_buffers: Any = None  # one set shared by every MoE layer (DeepEP), or None


def piecewise(schedule, tokens: float) -> float:
    """Value of a [[from_tokens, value], ...] schedule after `tokens` tokens."""
    value = schedule[0][1]
    for start, v in schedule:
        if tokens >= start:
            value = v
    return float(value)


def _cli_value(value) -> str:
    """A value as a Hydra override writes it (true / false for booleans)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def decoder_of(model: nn.Module) -> nn.Module:
    """The repeated blocks (`model.layers`), or the whole model if it has none."""
    return getattr(model, "layers", model)


def run_converters(model: nn.Module, made: Parallelized, fp8: Optional[FP8Recipe] = None,
                   defer_weights: bool = False, recompute: Optional[dict] = None, fp8_scopes=None,
                   high_precision_inputs: tuple[str, ...] = (), memory: Optional[dict] = None) -> None:
    """The converters a run asks for, applied through the one seam (moetron.core.convert): FP8 in
    `fp8_scopes(model)` (default: the decoder blocks), weight-gradient deferral in the decoder
    blocks (a pipeline with W actions; the store recorded in `made`;
    the loss tail stays as it is: its deferred gradients would keep the logits' gradient, [B, S, V]
    per head, alive until W), the recompute switches and the memory switches
    (moetron.parallel.memory). Refuses combinations that cannot work."""
    converters = []
    if fp8:
        converters.append(FP8Conversion(fp8, fp8_scopes or (lambda m: [decoder_of(m)]), high_precision_inputs))
    if defer_weights:
        made.weight_grad_store = WeightGradStore()
        converters.append(WeightGradDeferral(made.weight_grad_store, decoder_of))
    if recompute and any(recompute.values()):
        converters.append(SelectiveRecompute(recompute))
    if memory and any(memory.values()):
        converters.append(MemorySwitches(memory))
    apply_converters(model, converters)


class ModelSpec:
    """The default spec of a dense decoder; subclasses set `arch` and `config_cls` and override."""

    arch: str = ""
    config_cls: type = object
    # model-config keys that do not shape the weights (loss weights, balance speeds): a resume may
    # change them (the change is logged); every other key must equal the checkpoint's
    run_settings: tuple[str, ...] = ()
    # model-config keys that moved elsewhere -> where they are now (a checkpoint's saved config drops them)
    moved_keys: dict = {}
    # how the family maps to its transformers model (moetron.models.common.hf_adapter.HFAdapter), or None
    hf: Any = None

    # -- config and model ------------------------------------------------------------------------
    def config(self, node) -> Any:
        """The typed config from a Hydra/OmegaConf node (or a dict): unknown keys and wrong types raise
        ValueError naming `model.<key>`; then the config's own `validate()`, where it has one."""
        if isinstance(node, self.config_cls):
            cfg = node
        else:
            moved = [k for k in self.moved_keys if k in node]
            if moved:
                raise ValueError("; ".join(f"model.{k} is now {self.moved_keys[k]} (a run setting): set "
                                           f"{self.moved_keys[k]}={_cli_value(node[k])} instead" for k in moved))
            try:
                merged = OmegaConf.merge(OmegaConf.structured(self.config_cls), node)
                cfg = OmegaConf.to_object(merged)
            except OmegaConfBaseException as err:
                key = getattr(err, "full_key", None) or getattr(err, "key", None)
                where = f"model.{key}: " if key else "model: "
                raise ValueError(f"{where}{str(err).splitlines()[0]} (model.arch={self.arch!r}, "
                                 f"schema {self.config_cls.__name__})") from err
        if callable(getattr(cfg, "validate", None)):
            cfg.validate()
        return cfg

    def saved_config(self, node) -> Any:
        """The typed config of a checkpoint's saved `model` node, without keys that moved out of it."""
        return self.config({k: v for k, v in dict(node).items() if k not in self.moved_keys})

    def build(self, cfg, device: Optional[torch.device | str] = None) -> nn.Module:
        """The whole model; `device="meta"` builds without allocating (materialised per rank later)."""
        with torch.device(device) if device is not None else nullcontext():
            return self.build_module(cfg)

    def build_module(self, cfg) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__}.build_module")

    def problems(self, cfg, dims, topology, seq_len: int) -> list[str]:
        """What this model cannot do in this layout, each naming the key and the fix (checked before
        any process group starts)."""
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and seq_len > limit:
            return [f"train.seq_len={seq_len} exceeds model.max_position_embeddings={limit}"]
        return []

    def routed_experts(self, cfg) -> int:
        """Routed experts per MoE layer, which expert parallelism shards (0: a dense model)."""
        return 0

    def routing_groups(self, cfg) -> tuple[int, int]:
        """(expert groups, groups a token may reach) of group-limited routing; (0, 0) without."""
        return (0, 0)

    def ep_nodes_problem(self, cfg, ep_nodes: int) -> Optional[str]:
        """What is wrong with an EP group spanning `ep_nodes` nodes for this model's routing (None: nothing)."""
        return None

    # -- parallelism -----------------------------------------------------------------------------
    def parallelize(self, model: nn.Module, groups, dispatcher: str, defer_weights: bool,
                    fp8: Optional[FP8Recipe] = None, recompute: Optional[dict] = None,
                    memory: Optional[dict] = None) -> Parallelized:
        """Apply parallelism, precision and memory policies without touching model code (module
        converters, `run_converters`): FP8 in the decoder blocks (`fp8`), the weight-gradient
        deferral a pipeline's B/W split needs, the recompute switches (`recompute`: switch -> on), the
        memory switches (`memory`: switch -> on). A dense model has no dispatch: `fp8.dispatch` is moot."""
        made = Parallelized()
        run_converters(model, made, fp8, defer_weights, recompute, memory=memory)
        return made

    def recompute_switches(self, cfg) -> tuple[str, ...]:
        """The `recompute.<switch>` keys some module of the model has a slot for (the model on meta)."""
        from moetron.parallel.recompute import RECOMPUTE_SWITCHES

        modules = list(self.build(cfg, "meta").modules())
        return tuple(s for s in RECOMPUTE_SWITCHES if any(hasattr(m, f"recompute_{s}") for m in modules))

    def pipeline_split(self, model: nn.Module, schedule, pp_rank: int, layout: Optional[list],
                       num_microbatches: int) -> PipelineParts:
        return pipeline_split(model, schedule, pp_rank, layout, num_microbatches)

    def activation_shape(self, cfg, micro_batch: int, seq_len: int) -> tuple[int, ...]:
        """The shape of what one pipeline stage sends the next: [B, S, H]."""
        return (micro_batch, seq_len, cfg.hidden_size)

    # -- one step ----------------------------------------------------------------------------------
    def loss_options(self, cfg, train_cfg, tokens_seen: int) -> dict:
        """Keyword arguments of the model's loss for the next step (schedules in tokens)."""
        return {}

    def loss_metrics(self, cfg) -> dict[str, str]:
        """Metric names of the `LOSS_TERMS` entries this model reports (the others are not logged)."""
        return {"loss": "loss", "lm": "loss/lm"}

    def step_stats(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """This rank's float64 statistics of the step, to be summed over all ranks (one packed
        collective with the trainer's own metrics)."""
        return {}

    def after_step(self, model: nn.Module, summed: dict[str, torch.Tensor], train_cfg, tokens_seen: int,
                   update: bool = True) -> dict:
        """Run after the optimizer step with the summed statistics; return metrics to log. `update`
        False: the step was skipped (a non-finite gradient), so change no state, only report."""
        return {}

    # -- Hugging Face folders (moetron-export, model.init_from) -------------------------------------
    def save_hf(self, model: nn.Module, out_dir) -> None:
        """Write the whole model (on the CPU) as a Hugging Face folder (through `hf`)."""
        if self.hf is None:
            raise NotImplementedError(f"{self.arch} has no Hugging Face export")
        from moetron.models.hf import save_hf_folder

        save_hf_folder(model, out_dir)

    def load_hf(self, cfg, folder) -> dict:
        """The whole model's state dict (moetron names) from a Hugging Face folder (through `hf`)."""
        if self.hf is None:
            raise NotImplementedError(f"{self.arch} cannot start from a Hugging Face folder (model.init_from)")
        from moetron.models.hf import load_hf_folder

        return load_hf_folder(cfg, folder)

    def read_hf(self, cfg, folder, model: nn.Module) -> tuple[int, int]:
        """model.init_from: fill what this rank holds of `model` from a Hugging Face folder, reading
        only that (through `hf`); returns (bytes read, bytes of the folder's files)."""
        if self.hf is None:
            raise NotImplementedError(f"{self.arch} cannot start from a Hugging Face folder (model.init_from)")
        from moetron.models.hf import read_hf_folder

        return read_hf_folder(model, cfg, folder)

    def flops_per_token(self, cfg, seq_len: int) -> float:
        """Model FLOPs of one training token, from the config (the same in every layout)."""
        raise NotImplementedError(f"{type(self).__name__}.flops_per_token")

    def compile_blocks(self, model: nn.Module, backend: str = "inductor") -> int:
        """torch.compile each repeated block (`train.compile`): the decoder layers and, where the
        model has them, its MTP modules, compiled in place (names and parameters unchanged).
        Collectives inside a block (expert dispatch) are graph breaks. Returns how many."""
        blocks = [*getattr(model, "layers", []), *getattr(model, "mtp", [])]
        for block in blocks:
            block.compile(backend=backend)
        return len(blocks)

    def parameter_counts(self, cfg) -> tuple[int, int]:
        """(total parameters, parameters a token activates), for the planner. Activated counts
        the output head and not the input embedding table, which a token reads one row of."""
        raise NotImplementedError(f"{self.arch} has no parameter counts for moetron-plan")

    def layer_costs(self, cfg, seq_len: int, recompute: bool) -> list:
        """Per-token FLOPs and parameters of each layer in order (moetron.models.common.costs.LayerCost),
        for the planner: the embedding, the decoder layers, the head, then any MTP depths, the
        order in which moetron.plan.memory measures their activations."""
        raise NotImplementedError(f"{self.arch} has no per-layer costs: moetron-plan cannot plan it")


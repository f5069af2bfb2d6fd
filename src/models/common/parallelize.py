"""Apply parallelism to an MoE decoder without touching its code (torchtitan style).

Expert parallelism: every MoE layer (`moetron.models.common.moe.MoE`, MTP blocks included) keeps its router whole and replicated,
shards its routed experts over the EP group, and swaps its local dispatcher for an all-to-all one.
Pipelines cut the model with the generic split (`moetron.models.stages`), after the weight
gradients of its linears and experts are made deferrable (`moetron.parallel.weight_grads`). The
trainer builds the model on the meta device and allocates only what its rank holds
(moetron.parallel.materialize).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from moetron.comm.dispatch.deepep import DeepEPBuffers
from moetron.comm.dispatch.local import LocalDispatcher
from moetron.comm.traffic import TrafficCounter
from moetron.models.common.context_parallel import set_context_group
from moetron.models.common.moe import MoE
from moetron.models.common.router import TopKRouter
from moetron.models.spec import Parallelized, run_converters
from moetron.parallel.dims import ParallelGroups, data_parallel_copy
from moetron.parallel.expert_parallel import make_dispatcher, shard_experts
from moetron.precision.convert import FP8Recipe
from moetron.precision.fp8_dispatch import FP8DispatchCodec


def shard_moe_layers(model: nn.Module, groups: ParallelGroups, dispatcher: str, made: Parallelized,
                     codec=None) -> None:
    """Shard every MoE layer's routed experts over the EP group and plug an EP dispatcher (`codec`:
    how token rows travel; None: as they are); record what was made (traffic counter, expert
    parameters, DeepEP buffers) in `made`."""
    if groups is None or groups.dims.expert_ranks == 1:  # None: one process
        for module in model.modules() if codec is not None else []:
            if isinstance(module, MoE):  # nothing travels, but the rows are rounded as they would be
                module.dispatcher = LocalDispatcher(module.experts.global_experts, codec)
        return
    made.traffic = TrafficCounter()
    if dispatcher == "deepep":  # one set of (large) buffers for all layers
        made.dispatcher_buffers = DeepEPBuffers(groups.lanes("ep"))
    for module in model.modules():
        if isinstance(module, MoE):
            shard_experts(module.experts, groups.ep_rank, groups.dims.expert_ranks)
            module.dispatcher = make_dispatcher(dispatcher, module.experts.global_experts, groups, made.traffic,
                                                made.dispatcher_buffers, codec)
            made.expert_params += list(module.experts.parameters())


def connect_global_balance(model: nn.Module, groups: ParallelGroups) -> None:
    """Routers with the global-batch balance loss sum their expert counts over the dp x ep ranks, on a
    group of their own (created only where some router needs it)."""
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.settings.balance_mode == "global_aux_loss"]
    if groups is None or not routers:
        return
    group = data_parallel_copy(groups)
    for router in routers:
        router.balance_group = group


def connect_context(model: nn.Module, groups: ParallelGroups) -> None:
    """Context parallelism: routers sum each row's balance statistics over the cp group (its lanes:
    a forward's sums go over lane 0 while a backward's gathers use lane 1)."""
    if groups is not None and groups.dims.cp > 1:
        set_context_group(model, groups.lanes("cp"))


def decoder_and_mtp_blocks(model: nn.Module) -> list[nn.Module]:
    """Where FP8 runs: the decoder blocks and, where the model has them, its MTP depths."""
    return [model.layers, *([model.mtp] if hasattr(model, "mtp") else [])]


def parallelize(model: nn.Module, groups: ParallelGroups, dispatcher: str = "hierarchical",
                defer_weights: bool = False, fp8: Optional[FP8Recipe] = None,
                recompute: Optional[dict] = None, memory: Optional[dict] = None) -> Parallelized:
    """FP8 (`fp8`) in the decoder and MTP blocks (attention projections, dense MLPs, shared and
    routed experts; the embedding, head and routers stay as they are, report section 3.3.1; the
    attention output projection's input is never cached in FP8, section 3.3.3), expert parallelism
    over `groups` (with `fp8.dispatch` tokens travel to their experts in FP8), (`defer_weights`,
    for pipelines with W actions) deferrable weight gradients in the decoder blocks, and the
    recompute switches (`recompute`, section 3.2.3) and the memory switches (`memory`,
    moetron.parallel.memory), all through the module converters."""
    made = Parallelized()
    run_converters(model, made, fp8, defer_weights, recompute, fp8_scopes=decoder_and_mtp_blocks,
                   high_precision_inputs=("o_proj",), memory=memory)
    shard_moe_layers(model, groups, dispatcher, made, FP8DispatchCodec() if fp8 and fp8.dispatch else None)
    connect_global_balance(model, groups)
    connect_context(model, groups)
    return made

"""Cut a decoder model into pipeline stages built from the model's own forward pieces.

A model that pipelines (DeepSeek-V3, any registered decoder) exposes the pieces its `forward`
is made of, and the stages call the same pieces, so there is one forward path:

    model.layers                               nn.ModuleList of decoder blocks
    model.embed(input_ids_BS) -> h_BSH         the first stage runs it
    model.run_layers(h_BSH, layers) -> (h_BSH, balance or None)
    model.loss_terms(h_BSH, input_ids_BS, labels_BS, **options) -> LossTerms   (the loss tail)
    model.embedding_modules(), model.head_modules()   what the first stage / the tail hold

Stage i runs the decoder layers `layout[i]`; the first stage also embeds. The loss tail runs after
the last stage of a chain: its modules (for DeepSeek-V3 the final norm, head, MTP and the embedding
MTP reads) may sit on another rank than the first stage's, and their gradients are then summed
over the ranks holding them (`PipelineParts.shared`). A MoE layer's balance loss cannot ride to the
last stage with the activations, so each stage attaches it to its output (`attach_aux_loss`) and
reports it as a metric; the tail's loss includes its own.

Shape legend: B batch, S sequence, H hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from moetron.models.outputs import LossTerms


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, aux, scale: float):
        ctx.scale, ctx.aux_shape, ctx.aux_dtype = scale, aux.shape, aux.dtype
        return h.clone()

    @staticmethod
    def backward(ctx, grad_h):
        return grad_h, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_h.device), None


def attach_aux_loss(h: torch.Tensor, aux: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """h unchanged; in backward, `aux` receives gradient `scale` (as if `scale * aux` joined the loss)."""
    return h if aux is None else _AttachAuxLoss.apply(h, aux, scale)


def even_layout(num_layers: int, num_stages: int) -> list[list[int]]:
    """Layers split into contiguous runs, the earlier stages taking one more when uneven."""
    base, extra = divmod(num_layers, num_stages)
    layout, start = [], 0
    for i in range(num_stages):
        size = base + (1 if i < extra else 0)
        layout.append(list(range(start, start + size)))
        start += size
    return layout


class Stage(nn.Module):
    """Layers `layer_ids` of the model (plus the embedding on the first stage). Returns (h, metrics):
    the balance loss of its layers as LossTerms.logged(), or None without one."""

    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, aux_scale: float = 1.0) -> None:
        super().__init__()
        self.embedding = nn.ModuleList(model.embedding_modules() if first else [])  # held, for parameters
        self.layers = nn.ModuleList(model.layers[i] for i in layer_ids)
        self.first, self.aux_scale = first, aux_scale
        # the model's own pieces (bound methods, not submodules: the stage holds only its layers)
        self._embed, self._run_layers = model.embed, model.run_layers

    def forward(self, x: torch.Tensor, samples=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`samples`: the micro-batch's packed samples (moetron.models.common.packed), if any."""
        h_BSH = self._embed(x) if self.first else x
        h_BSH, balance = self._run_layers(h_BSH, self.layers, samples)
        metrics = None if balance is None else LossTerms(None, None, balance).logged()
        return attach_aux_loss(h_BSH, balance, self.aux_scale), metrics


class StageTail(nn.Module):
    """The loss after a chain's last stage; returns (loss, LossTerms.logged())."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.held = nn.ModuleList(model.head_modules())
        self._loss_terms = model.loss_terms

    def forward(self, h_BSH: torch.Tensor, target: tuple, **options):
        """`target`: (input ids, labels) or (input ids, labels, packed samples); `options` go to the
        model's loss (DeepSeek-V3: `mtp_weight`, the MTP loss's lambda)."""
        input_ids_BS, labels_BS, *samples = target
        if samples:
            options = {**options, "samples": samples[0]}
        terms = self._loss_terms(h_BSH, input_ids_BS, labels_BS, **options)
        return terms.total, terms.logged()


@dataclass
class PipelineParts:
    stage_modules: dict  # stage id -> Stage run by this rank
    tail: Optional[StageTail]  # the loss, on ranks that run a chain's last stage
    holders: dict = field(default_factory=dict)  # id(param) -> pp ranks holding it
    shared: dict = field(default_factory=dict)  # pp ranks (>1) -> this rank's parameters they share

    @property
    def held_modules(self) -> list[nn.Module]:
        """The modules this rank runs (its stages and, on a last stage, the loss tail)."""
        return [*self.stage_modules.values(), *([self.tail] if self.tail is not None else [])]


def pipeline_split(model: nn.Module, schedule, pp_rank: int, layout: Optional[list] = None,
                   num_microbatches: int = 1) -> PipelineParts:
    """This pipeline rank's stage modules of `schedule`, its loss tail, and which pipeline ranks hold
    each parameter (several do for DualPipe's mirrored stages and for the embedding a tail reads)."""
    num_layers = len(model.layers)
    layout = layout or even_layout(num_layers, schedule.num_modules)
    if sorted(i for ids in layout for i in ids) != list(range(num_layers)):
        raise ValueError(f"parallel.layout={layout} must list every layer 0..{num_layers - 1} once, in order")
    if len(layout) != schedule.num_modules:
        raise ValueError(f"parallel.layout has {len(layout)} stages; the {schedule.name} schedule on "
                         f"{schedule.num_ranks} ranks cuts the model into {schedule.num_modules}")
    # each micro-batch's loss is scaled by 1 / num_microbatches; its balance losses alike
    modules = [Stage(model, ids, first=i == 0, aux_scale=1.0 / num_microbatches) for i, ids in enumerate(layout)]
    tail = StageTail(model)

    def held_by(q: int) -> list[nn.Module]:
        mods: list[nn.Module] = [modules[schedule.module_of_stage[s]] for s in schedule.stages_on(q)]
        return mods + ([tail] if schedule.last_stages() & set(schedule.stages_on(q)) else [])

    holders: dict = {}
    for q in range(schedule.num_ranks):
        for module in held_by(q):
            for p in module.parameters():
                holders.setdefault(id(p), set()).add(q)
    mine = {id(p) for m in held_by(pp_rank) for p in m.parameters()}
    shared: dict = {}
    for p in model.parameters():  # model order: every holder lists a shared set's parameters alike
        ranks = tuple(sorted(holders.get(id(p), ())))
        if id(p) in mine and len(ranks) > 1:
            shared.setdefault(ranks, []).append(p)
    stage_modules = {s: modules[schedule.module_of_stage[s]] for s in schedule.stages_on(pp_rank)}
    has_tail = bool(schedule.last_stages() & set(schedule.stages_on(pp_rank)))
    return PipelineParts(stage_modules, tail if has_tail else None,
                         {pid: tuple(sorted(r)) for pid, r in holders.items()}, shared)

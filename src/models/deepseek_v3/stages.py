"""Cut a DeepSeek-V3 model into pipeline stages.

Stage i runs the decoder layers `layout[i]`; the first stage also embeds the input ids, and the
last one's output goes to `StageTail`, the loss: final norm, output head, cross entropy and the MTP
depths, which read the embedding and the head. Under DualPipeV the first and last stage live on the
same rank, so MTP shares the embedding and head physically (report section 3.2.3); elsewhere the
last rank holds a copy of the embedding whose gradient must be summed with the first rank's.

A MoE layer's balance loss cannot ride to the last stage with the activations, so each stage
attaches it to its output (`attach_aux_loss`): the forward value is unchanged and the backward adds
d(aux)/d(params), scaled like the main loss.

Shape legend: B batch, S sequence, H hidden.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetron.models.deepseek_v3.layers import rotary_cos_sin
from moetron.models.deepseek_v3.model import _add, cross_entropy
from moetron.models.deepseek_v3.mtp import mtp_depths


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
    """Layers `layer_ids` of the model (plus the embedding on the first stage)."""

    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, aux_scale: float = 1.0) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleList(model.layers[i] for i in layer_ids)
        self.aux_scale = aux_scale
        self.balance_seen: list[torch.Tensor] = []  # each call's balance loss, for logging (no device sync here)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_BSH = self.embed_tokens(x) if self.embed_tokens is not None else x
        cos, sin = rotary_cos_sin(h_BSH.shape[1], self.cfg.qk_rope_head_dim, self.cfg.rope_theta, h_BSH.device,
                                  h_BSH.dtype)
        aux = None
        for layer in self.layers:
            h_BSH, balance = layer(h_BSH, cos, sin)
            aux = _add(aux, balance)
        if aux is not None:
            self.balance_seen.append(aux.detach())
        return attach_aux_loss(h_BSH, aux, self.aux_scale)


class StageTail(nn.Module):
    """The loss after the last stage: LM cross entropy plus (lambda / D) sum_k MTP losses."""

    def __init__(self, model: nn.Module, aux_scale: float = 1.0) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.norm, self.lm_head, self.embed_tokens, self.mtp = model.norm, model.lm_head, model.embed_tokens, model.mtp
        self.mtp_loss_weight = model.mtp_loss_weight  # the trainer follows its schedule
        self.aux_scale = aux_scale
        self.losses_seen: list[tuple] = []  # (lm, mtp, MTP balance) tensors or None per call, for logging

    def forward(self, h_BSH: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        input_ids_BS, labels_BS = target
        loss_lm = cross_entropy(self.lm_head(self.norm(h_BSH)), labels_BS)
        cos, sin = rotary_cos_sin(h_BSH.shape[1], self.cfg.qk_rope_head_dim, self.cfg.rope_theta, h_BSH.device,
                                  h_BSH.dtype)
        loss_mtp, balance_mtp = None, None
        for normed_BSH, labels_k_BS, balance in mtp_depths(self.mtp, self.embed_tokens, h_BSH, input_ids_BS,
                                                           labels_BS, cos, sin):
            normed_BSH = attach_aux_loss(normed_BSH, balance, self.aux_scale)
            balance_mtp = _add(balance_mtp, balance)
            loss_k = cross_entropy(self.lm_head(normed_BSH), labels_k_BS)
            loss_mtp = _add(loss_mtp, loss_k * (self.mtp_loss_weight / len(self.mtp)))
        self.losses_seen.append(tuple(None if t is None else t.detach() for t in (loss_lm, loss_mtp, balance_mtp)))
        return _add(loss_lm, loss_mtp)


def build_stages(model: nn.Module, layout: list[list[int]], aux_scale: float = 1.0) -> tuple[list[Stage], StageTail]:
    """All stages of the model (every rank keeps the ones it runs) and the loss tail."""
    covered = sorted(i for ids in layout for i in ids)
    if covered != list(range(model.cfg.num_hidden_layers)):
        raise ValueError(f"parallel.layout={layout} must list every layer 0..{model.cfg.num_hidden_layers - 1} once, "
                         "in order")
    stages = [Stage(model, ids, first=i == 0, aux_scale=aux_scale) for i, ids in enumerate(layout)]
    return stages, StageTail(model, aux_scale)

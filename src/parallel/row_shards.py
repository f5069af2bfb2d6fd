"""The training state under names and shapes that do not depend on the parallel layout.

A checkpoint keys every tensor by what it is in the whole model, never by the rank that held it:
- the model: its parameter and buffer names (global layer index, `state_dict` names); an expert
  stack sharded over EP keeps its whole shape [E, ...], row e being global expert e;
- the optimizer: `optim/<parameter name>/<state>` (`exp_avg`, `exp_avg_sq`, `step`), each moment of
  the parameter's whole shape, whether this rank steps on the whole parameter, its experts' rows,
  or (ZeRO-1) a row range of them.

What a rank holds of such a tensor is a `RowShard` (rows [row_offset, row_offset + rows) of a tensor
of `global_rows` rows) or the whole tensor. `moetron.checkpoint.dcp_io` saves and loads these with
torch.distributed.checkpoint, which reshards: a checkpoint written in one layout loads in any other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moetron.parallel.materialize import expert_rows, held_state_dict

OPTIM_PREFIX = "optim/"
MODEL_PREFIX = "model/"
EMA_PREFIX = "ema/"  # the parameter average (moetron.train.ema)
REF_PREFIX = "ref/"  # GRPO's frozen reference model (moetron.train.ema.FrozenReference)


@dataclass
class RowShard:
    """Rows [row_offset, row_offset + local.shape[0]) of a tensor of `global_rows` rows; `local` is
    this rank's storage of them (a view: loading writes into it)."""
    local: torch.Tensor
    row_offset: int
    global_rows: int

    @property
    def global_shape(self) -> torch.Size:
        return torch.Size((self.global_rows, *self.local.shape[1:]))


def model_state(model: nn.Module, sharded: list = ()) -> dict:
    """What this rank holds of the model (`model/<name>`): whole tensors, and its rows of the expert
    stacks. A parameter with float32 master weights (`sharded`: the finalizer's ShardedParams) is
    saved from its master, this rank's rows of it under ZeRO-1: checkpoints keep float32 weights
    whatever the working weights' dtype (loading writes into the masters)."""
    rows, masters = expert_rows(model), master_rows(sharded)
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {}
    for name, tensor in held_state_dict(model).items():
        first, global_rows = rows.get(name, (0, _rows(tensor)))
        if name in params and id(params[name]) in masters:
            master, start, count = masters[id(params[name])]
            if not count:
                continue  # this rank's master rows are padding only
            tensor, first = master.detach()[:count], first + start
        whole = _rows(tensor) == global_rows
        state[MODEL_PREFIX + name] = tensor if whole else RowShard(tensor, first, global_rows)
    return state


def master_rows(sharded: list) -> dict[int, tuple[torch.Tensor, int, int]]:
    """id(parameter) -> (its master weights (shard), the first of the parameter's rows they hold, how
    many of them; the rest of the shard is padding), for the finalizer's ShardedParams."""
    out = {}
    for group in sharded:
        for p, shard, r in zip(group.params, group.shards, group.rows):
            first = group.rank * r
            out[id(p)] = (shard, first, max(0, min(r, _rows(p) - first)))
    return out


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: list) -> dict:
    """What this rank holds of the optimizer state (`optim/<name>/<state>`), whole or as row shards:
    its experts' rows under EP, and under ZeRO-1 (`sharded`: the finalizer's ShardedParams) its
    shard's rows of those. Creates the state (zeros) where the optimizer has not stepped yet, so that
    a checkpoint can load into it."""
    init_optimizer_state(optimizer)
    rows = expert_rows(model)
    # optimizer parameter -> (name, the model's parameter, first row and rows of it that it steps on)
    targets = {id(p): (name, p, 0, _rows(p)) for name, p in model.named_parameters() if not p.is_meta}
    for pid, (master, first, count) in master_rows(sharded).items():
        name, p, _, _ = targets[pid]
        targets[id(master)] = (name, p, first, count)
    state = {}
    for param in (p for group in optimizer.param_groups for p in group["params"]):
        name, held, first, count = targets[id(param)]
        offset, global_rows = rows.get(name, (0, _rows(held)))
        for key, value in optimizer.state[param].items():
            fqn = f"{OPTIM_PREFIX}{name}/{key}"
            if not torch.is_tensor(value) or value.ndim == 0:
                state[fqn] = value  # the step count: the same on every rank holding the parameter
            elif count == global_rows:
                state[fqn] = value
            elif count:
                state[fqn] = RowShard(value[:count], offset + first, global_rows)
    return state


def _rows(p: torch.Tensor) -> int:
    return p.shape[0] if p.ndim else 0


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state as its first step would create it (moments of zeros, step 0), for parameters that
    have none yet."""
    moments_dtype = getattr(optimizer, "moments_dtype", None)
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            if optimizer.state[p]:
                continue
            dtype = moments_dtype or p.dtype
            optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}

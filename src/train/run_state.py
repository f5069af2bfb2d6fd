"""What a run saves and restores besides the model: checkpoint part names per rank, RNG states,
and the resume and save steps of the training loop (moetron.train.checkpoint does the atomic writes).

Checkpoints hold one model shard per (pp, ep) rank and one optimizer file per (pp, ep) rank, or per
rank under ZeRO-1; resuming needs the layout that wrote them (a checkpoint of another layout stops
the run with the reason). RNG states are stored as tensors and plain data, so every part loads
with `weights_only=True`.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from moetron.parallel.materialize import held_state_dict, load_held_state_dict
from moetron.train import checkpoint
from moetron.train.errors import UserInputError


def rng_state() -> dict:
    """The RNG states as tensors and plain data (a checkpoint loads with weights_only=True)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple with an array: a checkpoint from before 2026-12-01


def resume(run_dir: Path, cfg, spec, model_cfg, model, optimizer, groups, finalizer):
    """(step, tokens) of the newest loadable checkpoint, restored into model/optimizer/RNG; (0, 0) if none."""
    model_name, optim_name = shard_names(groups, finalizer.zero1)
    found, other_layout = None, None
    try:
        found = checkpoint.load_latest(run_dir / "checkpoints", (model_name, optim_name, "trainer")) if cfg.train.resume else None
    except checkpoint.OtherLayout as err:
        other_layout = str(err)
    # every rank learns every rank's outcome before any raises (one rank alone raising would leave
    # the others waiting in the next collective)
    outcomes = [other_layout or (found[0] if found else 0)]
    if groups.dims.world_size > 1:
        outcomes = [None] * groups.dims.world_size
        torch.distributed.all_gather_object(outcomes, other_layout or (found[0] if found else 0))
    layout_error = next((o for o in outcomes if isinstance(o, str)), None)
    if layout_error is not None:
        raise UserInputError(f"{layout_error}. {_RESUME_WITH_THE_LAYOUT}")
    steps = outcomes
    if len(set(steps)) > 1:
        raise UserInputError(f"ranks found different newest checkpoints in {run_dir / 'checkpoints'} (steps {steps}); "
                             "a shard is missing or corrupt: remove the newest step folder to resume from the previous one")
    if found is None:
        return 0, 0
    step, parts = found
    parts = {"model": parts[model_name], "optim": parts[optim_name], "trainer": parts["trainer"]}
    saved_layout, layout = parts["trainer"].get("layout"), layout_of(groups, finalizer.zero1)
    if saved_layout is not None and saved_layout != layout:  # the same on every rank: all raise
        raise UserInputError(f"the newest checkpoint in {run_dir / 'checkpoints'} was written with layout "
                             f"{saved_layout}, this run has {layout}. {_RESUME_WITH_THE_LAYOUT}")
    # compared as typed configs: a preset lists some keys, the schema's defaults fill the rest
    try:
        saved_model_cfg = dataclasses.asdict(spec.config(parts["trainer"]["config"]["model"]))
    except ValueError as err:
        raise UserInputError(f"the checkpoint in {run_dir / 'checkpoints'} has model settings this version cannot "
                             f"read ({err}); use a new hydra.run.dir or train.resume=false") from err
    current_model_cfg = dataclasses.asdict(model_cfg)
    for config in (saved_model_cfg, current_model_cfg):  # where a run started does not bind its resume
        config.pop("init_from", None)
    if saved_model_cfg != current_model_cfg:
        changed = sorted(k for k in current_model_cfg if saved_model_cfg.get(k) != current_model_cfg[k])
        raise UserInputError(f"the checkpoint in {run_dir / 'checkpoints'} was trained with other model settings "
                             f"({', '.join('model.' + k for k in changed)}); use a new hydra.run.dir or "
                             "train.resume=false")
    try:
        load_held_state_dict(model, parts["model"])
    except KeyError as err:
        raise UserInputError(f"{run_dir / 'checkpoints'}: {err.args[0]}; use a new hydra.run.dir or train.resume=false") from err
    finalizer.load_shards_from_params()
    optimizer.load_state_dict(parts["optim"])
    set_rng_state(parts["trainer"]["rng"])
    return step, parts["trainer"]["tokens"]


_RESUME_WITH_THE_LAYOUT = ("Resume with the layout that wrote it (parallel.pp, parallel.ep, parallel.dp, parallel.zero1), "
                           "or start in a new hydra.run.dir: checkpoints do not move between layouts yet")


def layout_of(groups, zero1: bool) -> dict:
    """What a checkpoint's files depend on, stored with it and compared on resume."""
    dims = groups.dims
    return {"pp": dims.pp, "dp": dims.dp, "ep": dims.ep, "zero1": zero1}


def shard_names(groups, zero1: bool) -> tuple[str, str]:
    """Checkpoint part names of this rank's model and optimizer: one model file per (pp, ep) rank,
    and one optimizer file per (pp, ep) rank, or per (pp, dp, ep) rank under ZeRO-1 (sharded state)."""
    dims, (pp_idx, dp_idx, ep_idx) = groups.dims, groups.dims.coords(groups.rank)
    suffix = (f"-pp{pp_idx}" if dims.pp > 1 else "") + (f"-ep{ep_idx}" if dims.ep > 1 else "")
    optim_suffix = suffix + (f"-dp{dp_idx}" if zero1 else "")
    return f"model{suffix}", f"optim{optim_suffix}"


def save(run_dir, step, tokens, model, optimizer, config_dict, keep, world, groups, zero1: bool) -> None:
    """Rank 0 stages the folder; the first dp replica of every (pp, ep) rank writes its model shard and
    optimizer state (under ZeRO-1 every rank writes its optimizer shard); rank 0 commits."""
    root = run_dir / "checkpoints"
    if world.is_main:
        checkpoint.begin(root, step)
    barrier(world)
    _, dp_idx, _ = groups.dims.coords(world.rank)
    model_name, optim_name = shard_names(groups, zero1)
    parts = {}
    if dp_idx == 0:
        parts[model_name] = held_state_dict(model)
    if dp_idx == 0 or zero1:
        parts[optim_name] = optimizer.state_dict()
    if parts:
        if world.is_main:
            parts["trainer"] = {"step": step, "tokens": tokens, "data_position": step, "rng": rng_state(),
                                "config": config_dict, "layout": layout_of(groups, zero1)}
        checkpoint.write(checkpoint.staging_dir(root, step), parts)
    barrier(world)
    if world.is_main:
        checkpoint.commit(root, step, keep)
    barrier(world)


def barrier(world) -> None:
    if world.size > 1:
        torch.distributed.barrier()

"""What a run saves and restores: the model and optimizer state under names that do not depend on
the parallel layout (moetron.parallel.row_shards), written and read with torch.distributed.checkpoint
(moetron.checkpoint.dcp_io), and `trainer.pt` (step, tokens, skipped steps, RNG, the config and the
layout that wrote it); moetron.checkpoint.folders makes the folder appear whole or not at all.

A checkpoint written in one layout resumes in any other: change parallel.pp, parallel.ep,
parallel.dp, the schedule or parallel.zero1 between runs, and every rank loads what it now holds
from whatever the writing ranks held. The data position follows from the tokens trained (a step's
first sequence is tokens / train.seq_len) and the RNG state is restored, so the run goes on as if it
had never stopped. Everything loads with `weights_only=True` or DCP's metadata classes only.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from moetron.parallel.row_shards import model_state, optimizer_state
from moetron.checkpoint import dcp_io, folders
from moetron.core.errors import UserInputError


def rng_state() -> dict:
    """The RNG states as tensors and plain data (a checkpoint loads with weights_only=True)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]  # only checkpoints of this format reach here: always a dict
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))


def training_state(model, optimizer, finalizer, copies=()) -> dict:
    """This rank's part of the model and optimizer state (and the parameter copies: the average,
    `ema/<name>`, GRPO's reference, `ref/<name>`; moetron.train.ema),
    under layout-independent names; an optimizer that counts steps per parameter group (NVIDIA apex's
    FusedAdam) gets its counts as `optim/param_group<i>/step` (the groups are the same in every layout)."""
    state = {**model_state(model, finalizer.sharded), **optimizer_state(model, optimizer, finalizer.sharded)}
    for copy in copies:
        state.update(copy.state())
    for i, group in enumerate(optimizer.param_groups):
        if "step" in group:
            state[f"optim/param_group{i}/step"] = torch.tensor(float(group["step"]))
    return state


@dataclasses.dataclass
class Progress:
    """How far a run has come (where it resumes: 0s for a new run)."""
    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0


def resume(run_dir: Path, config: dict, spec, model_cfg, model, optimizer, finalizer, copies=()) -> Progress:
    """Restore the newest loadable checkpoint under run_dir into model, optimizer, RNG and the
    parameter copies (moetron.train.ema: each has its `prefix`), whatever layout wrote it. A copy the
    checkpoint lacks starts from the resumed parameters. A corrupt one is skipped with a warning; one that cannot be loaded into this
    run stops it with the reason (every rank sees the same files and the same outcome)."""
    if not config["train"]["resume"]:
        return Progress()
    unreadable = []
    for step, path in folders.complete_dirs(run_dir / "checkpoints"):
        try:
            trainer = folders.load_part(path / "trainer.pt")
        except Exception as err:  # unreadable: try the previous one
            folders.skip_corrupt(path, err)
            unreadable.append(f"{path.name}: {type(err).__name__}: {err}")
            continue
        _check_model_settings(path, trainer, spec, model_cfg)
        _warn_if_the_data_changed(path, trainer, config)
        changes = changed_run_settings(trainer["config"], config, spec)
        if changes and _is_main():
            print(f"resuming with run settings changed since {path.name}: " + "; ".join(changes), flush=True)
        if not (path / dcp_io.METADATA_FILE).is_file():
            raise UserInputError(
                f"{path} is in the per-rank format of moetron before 2026-12-02 (written with layout "
                f"{trainer.get('layout')}), which this version does not resume. Export its weights with "
                f"`moetron-export {run_dir} --hf OUT_DIR` and start a run from them in a new hydra.run.dir "
                "(model.init_from=OUT_DIR), or finish this run with the version that wrote it")
        try:
            saved = dcp_io.saved_shapes(path)
            held = [c for c in copies if any(k.startswith(c.prefix) for k in saved)]
            state = training_state(model, optimizer, finalizer, held)
            group_steps = _group_steps(saved, optimizer, state)
            dcp_io.load_state(path, state)
        except (KeyError, ValueError) as err:
            raise UserInputError(f"{path} does not fit this run: {err}; use a new hydra.run.dir or "
                                 "train.resume=false") from err
        except Exception as err:  # a part that cannot be read: the same on every rank (DCP gathers failures)
            folders.skip_corrupt(path, err)
            unreadable.append(f"{path.name}: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        for i, group_step in group_steps.items():
            optimizer.param_groups[i]["step"] = int(group_step)
        finalizer.params_from_masters()  # the checkpoint loaded into the master weights, where there are any
        for copy in copies:
            if copy not in held:  # it starts here, from the resumed parameters
                copy.reset_to_parameters()
                print(f"{path} holds no {copy.description}: it starts from this step's parameters", flush=True)
        set_rng_state(trainer["rng"])
        return Progress(step, trainer["tokens"], trainer.get("skipped_steps", 0))
    if unreadable:  # starting over would overwrite the run's metrics, and pruning would drop the new checkpoints
        raise UserInputError(f"no checkpoint in {run_dir / 'checkpoints'} could be loaded ({'; '.join(unreadable)}); "
                             "repair or move them away to resume from an older one, or start in a new hydra.run.dir")
    return Progress()


def _group_steps(saved: dict, optimizer, state: dict) -> dict[int, torch.Tensor]:
    """Holders, added to `state`, for the per-group step counts the checkpoint has (`saved`: its
    tensors; apex's FusedAdam creates its groups' counts at its first step, so a resuming optimizer
    has none yet)."""
    holders = {i: torch.zeros(()) for i in range(len(optimizer.param_groups)) if f"optim/param_group{i}/step" in saved}
    state.update({f"optim/param_group{i}/step": t for i, t in holders.items()})
    return holders


def _warn_if_the_data_changed(path: Path, trainer: dict, config: dict) -> None:
    """Data settings that change which sequences come next: said, not refused (adding data is legitimate)."""
    saved = trainer["config"]
    keys = [("data", k) for k in ("path", "blend", "tokenizer", "valid_path", "valid_fraction")] + \
        [("train", k) for k in ("seq_len", "seed")]
    changed = [f"{group}.{key}" for group, key in keys
               if saved.get(group, {}).get(key) != config[group].get(key)]
    if changed:
        print(f"note: {', '.join(changed)} differ from {path}'s: the run goes on with other sequences than it would "
              "have had", flush=True)


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _check_model_settings(path: Path, trainer: dict, spec, model_cfg) -> None:
    """What shapes the weights equals the checkpoint's (compared as typed configs: a preset lists
    some keys, the schema's defaults fill the rest); the model's run settings may differ."""
    try:
        saved = dataclasses.asdict(spec.saved_config(trainer["config"]["model"]))
    except ValueError as err:
        raise UserInputError(f"the checkpoint {path} has model settings this version cannot read ({err}); train "
                             "in a new hydra.run.dir") from err
    current = dataclasses.asdict(model_cfg)
    changed = sorted(k for k in current if saved.get(k) != current[k] and k not in spec.run_settings)
    if changed:
        was = ", ".join(f"model.{k}={saved.get(k)!r} (now {current[k]!r})" for k in changed)
        raise UserInputError(f"the checkpoint {path} holds weights of another model: {was}. Set them back to resume "
                             "this run, or train the new model in a new hydra.run.dir (moetron-export's Hugging Face "
                             "folder starts it from these weights as model.init_from where the shapes allow)")


def changed_run_settings(saved: dict, current: dict, spec, ignore: tuple[str, ...] = ("data", "logging")) -> list[str]:
    """`key: old -> new` for every run setting that differs from the checkpoint's config (`saved`):
    the model's run settings and everything outside `model`, but the groups in `ignore` (data has a
    note of its own; logging does not touch the weights)."""
    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], node

    old, new = dict(leaves(saved)), dict(leaves(current))
    out = []
    for key in sorted(set(old) | set(new)):
        group, _, name = key.partition(".")
        if group in ignore or (group == "model" and name not in spec.run_settings) or group == "hydra":
            continue
        if key in ("train.resume", "train.exit_after_steps", "model.init_from") or old.get(key) == new.get(key):
            continue  # init_from: cleared on every resume (the checkpoint has the weights)
        if key not in old or key not in new:
            continue  # a key another version of moetron added or removed, not a change of the user's
        out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


def layout_of(groups, zero1: bool) -> dict:
    """The layout that wrote a checkpoint, kept in trainer.pt for the record (it loads into any other)."""
    dims = groups.dims
    return {"pp": dims.pp, "dp": dims.dp, "ep": dims.ep, "cp": dims.cp, "zero1": zero1}


def save(run_dir: Path, step: int, progress: Progress, model, optimizer, finalizer, config_dict: dict, keep: int,
         world, groups, copies=()) -> None:
    """Rank 0 stages the folder; every rank writes what it holds (a tensor several ranks hold is
    written once); rank 0 adds trainer.pt and commits. `progress`: its tokens and skipped steps."""
    root = run_dir / "checkpoints"
    if world.is_main:
        folders.begin(root, step)
    barrier(world)
    staging = folders.staging_dir(root, step)
    dcp_io.save_state(staging, training_state(model, optimizer, finalizer, copies))  # collective: all written after it
    if world.is_main:
        trainer = {"step": step, "tokens": progress.tokens, "skipped_steps": progress.skipped_steps,
                   "data_position": step, "rng": rng_state(), "config": config_dict,
                   "layout": layout_of(groups, finalizer.zero1)}
        folders.write(staging, {"trainer": trainer})
        folders.commit(root, step, keep)
    barrier(world)


def barrier(world) -> None:
    if world.size > 1:
        torch.distributed.barrier()

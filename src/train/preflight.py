"""A command line looked at once, in one process, before Hydra or any rank starts.

`moetron-train` composes the config as Hydra will on every start: a misspelled key, a wrong type or
an unknown preset is said once (rank 0 of a torchrun job; the other ranks exit quietly), with the
closest real key, instead of Hydra's message on every rank and its advice to add `+`. A run
directory that a live run holds is refused before Hydra writes into it.

`moetron-train --check [--world-size N] OVERRIDES...` also runs every check a rank runs before its
process groups start (moetron.train.trainer.check: layout and world size, batch sizes, model, data,
run directory), then prints one line and exits: 0 when the config would start, 2 with the message
when not. `launch/train.sh` and the sbatch script run it before they start ranks; put it before your
own torchrun line with the same overrides and `--world-size` (default: $WORLD_SIZE or $SLURM_NTASKS,
else 1). A layout over several nodes outside SLURM is checked as `cluster.nodes` and
`cluster.gpus_per_node` say (set them as the run will have them).
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Optional

from hydra import compose, initialize_config_module
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from moetron.core.errors import UserInputError

CHECK_FLAG, WORLD_SIZE_FLAG = "--check", "--world-size"


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `moetron-train OVERRIDES` runs with (Hydra's own node under `hydra`)."""
    # job_name: what Hydra calls moetron-train's job (the module of its app), for ${hydra:job.name}
    with initialize_config_module(config_module="moetron.conf", version_base="1.3", job_name="cli"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _group_choices(overrides: list[str]) -> list[str]:
    """The overrides that choose presets or Hydra's search path: what the set of real keys depends on."""
    return [o for o in overrides if o.startswith("hydra.searchpath=")
            or (re.match(r"^[\w/]+=", o) and not o.startswith("hydra"))]


def _dotted_keys(node, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, dict):
        for k, v in node.items():
            keys.append(f"{prefix}{k}")
            keys += _dotted_keys(v, f"{prefix}{k}.")
    return keys


def closest_key(key: str, overrides: list[str]) -> Optional[str]:
    """The real key most like `key` in the config these presets compose, or None."""
    try:
        base = compose_config(_group_choices(overrides))
    except (HydraException, OmegaConfBaseException, ValueError):
        return None
    known = _dotted_keys({k: v for k, v in OmegaConf.to_container(base, resolve=False).items() if k != "hydra"})
    parent = key.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    for pool in (siblings, known):  # the same parent first: train.max_step -> train.max_steps
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    return None


def _moved_key(key: str, overrides: list[str]) -> Optional[str]:
    """Where a model key that became a run setting lives now (the spec's `moved_keys`)."""
    if not key.startswith("model."):
        return None
    from moetron.models.registry import get_spec
    try:
        arch = compose_config(_group_choices(overrides)).model.arch
        return get_spec(arch).moved_keys.get(key.removeprefix("model."))
    except (HydraException, OmegaConfBaseException, ValueError, KeyError, AttributeError):
        return None


def explain(err: Exception, overrides: list[str]) -> str:
    """Hydra's composition error as one message naming the key and the fix."""
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    text = str(err)
    if isinstance(err, MissingConfigException) or "Could not find" in text:
        found = re.search(r"Could not find '([^']+)/([^']+)'", text)
        options = re.findall(r"^\t(\S+)$", text, re.M)
        if found:
            group, name = found.groups()
            guess = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
            hint = f"; did you mean {group}={guess[0]}?" if guess else ""
            return f"{group}={name}: no such preset{hint} (choose one of: {', '.join(options)})"
    if key and ("Could not override" in text or "Could not append" in text or "not in struct" in str(cause)):
        # the override as typed: of trian.max_steps=3 Hydra names only `trian`
        typed, _, value = next((o.lstrip("+~") for o in overrides
                                if re.match(rf"{re.escape(key)}(=|\.)", o.lstrip("+~"))), key).partition("=")
        moved = _moved_key(key, overrides)
        if moved:
            return f"{key} is now {moved} (a run setting): set {moved}={value or '...'} instead"
        guess = closest_key(typed, overrides) or closest_key(key, overrides)
        key = typed
        hint = f"did you mean {guess}?" if guess else "remove it or fix its spelling"
        return f"{key} is not a setting: {hint} (`moetron-train --cfg job` prints every key)"
    if "multirun" in text.lower():  # a sweep's syntax without -m: Hydra says how
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    detail = str(cause).splitlines()[0] if cause is not None and str(cause) else text.splitlines()[0]
    where = f"{key}: " if key and key not in detail else ""
    return f"{where}{detail}"


def run_dir_of(cfg: DictConfig) -> Optional[Path]:
    """The run directory a single run would use (`hydra.run.dir`, by default a new dated folder), or
    None where it names what only Hydra's running app knows (`${hydra:runtime...}`)."""
    try:
        return Path(OmegaConf.select(cfg, "hydra.run.dir"))
    except OmegaConfBaseException:
        return None


def preflight(overrides: list[str], world_size: int, full: bool, probe_lock: bool = True) -> str:
    """Compose `overrides` as Hydra will; raise UserInputError with one message if that fails, if the
    run directory is held by a live run (`probe_lock`: one rank of a job asks), or (`full`) if any
    check of a rank's start fails. Returns a one-line description of the run (for --check)."""
    from moetron.checkpoint.run_lock import holder_of
    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException, ValueError, AttributeError) as err:
        raise UserInputError(explain(err, overrides)) from err
    run_dir = run_dir_of(cfg)
    holder = holder_of(run_dir) if run_dir is not None and probe_lock else None
    if holder is not None:
        raise UserInputError(holder)
    with open_dict(cfg):
        del cfg["hydra"]
    from moetron.train.validate import unknown_key_problems
    problems = unknown_key_problems(cfg)  # keys added with Hydra's `+`
    if problems:
        raise UserInputError("\n  ".join(problems))
    if not full:
        return ""
    from moetron.train.trainer import check
    checked = check(cfg, run_dir, world_size)
    dims = checked.dims
    return (f"config ok for {world_size} rank{'s' if world_size > 1 else ''}: pp={dims.pp} x dp={dims.dp} x "
            f"ep={dims.ep}{f' x cp={dims.cp}' if dims.cp > 1 else ''}, model.arch={cfg.model.arch}, "
            f"{cfg.train.max_steps} steps, run dir "
            f"{run_dir if run_dir is not None else '(named by Hydra as the run starts)'}")


def split_argv(argv: list[str]) -> tuple[bool, Optional[int], list[str]]:
    """(--check given, --world-size N or None, the rest) of moetron-train's arguments."""
    check, world_size, rest = False, None, []
    args = iter(argv)
    for arg in args:
        if arg == CHECK_FLAG:
            check = True
        elif arg == WORLD_SIZE_FLAG or arg.startswith(WORLD_SIZE_FLAG + "="):
            value = arg.partition("=")[2] or next(args, "")
            if not value.isdigit() or int(value) < 1:
                raise UserInputError(f"{WORLD_SIZE_FLAG} takes a number of ranks, got {value!r}")
            world_size = int(value)
        else:
            rest.append(arg)
    if world_size is not None and not check:
        raise UserInputError(f"{WORLD_SIZE_FLAG} goes with {CHECK_FLAG} (a run takes its world size from its launcher)")
    return check, world_size, rest


def world_size_for_check(given: Optional[int]) -> int:
    """--world-size, else the job's: torchrun's WORLD_SIZE, SLURM's SLURM_NTASKS, else 1."""
    if given is not None:
        return given
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def hydra_runs_it_otherwise(overrides: list[str]) -> bool:
    """Hydra's flags (-m, --cfg, --help, ...) or a multirun chosen by `hydra.mode=`: Hydra's own
    handling goes first, and a sweep's jobs are checked as each starts."""
    return any(arg.startswith("-") or arg.startswith("hydra.mode=") for arg in overrides)

"""Everything a user can get wrong in a composed config, checked before any process group starts.

`validate(cfg, world_size)` returns the parallel dimensions or raises ValueError listing every
problem, each naming the key, the value and the fix: keys the schemas do not know (however they
were added: Hydra's `+key=value` included), numbers out of range, and what must agree across
groups (world size and layout, batch sizes and ranks, the schedule's micro-batches, experts and EP,
node-limited routing and nodes, dispatchers this machine cannot run).
"""
from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moetron.comm.dispatch.deepep import deepep_problems
from moetron.data.packing import OVERLONG, PACKINGS
from moetron.models.registry import get_spec
from moetron.parallel.dims import ParallelDims, Topology
from moetron.parallel.expert_parallel import DISPATCHERS
from moetron.pipeline.builders import BUILDERS, MinimumMicrobatches, build_schedule
from moetron.pipeline.schedule import splits_weight_grads
from moetron.precision.dtypes import dtype_problems
from moetron.precision.fp8_gemm import resolve_backend
from moetron.train.batch_ramp import ramp_batches, ramp_problems
from moetron.train.config import RootConfig
from moetron.train.lr_schedule import schedule_problems

DTYPES = ("auto", "float32", "bfloat16")
WANDB_MODES = ("auto", "disabled", "offline", "online")

# (key, lowest allowed value) per numeric setting; a None value is "unset" and skips the check
AT_LEAST = [
    ("parallel.pp", 1), ("parallel.ep", 1), ("parallel.dp", 1), ("parallel.cp", 1),
    ("train.max_steps", 1), ("train.global_batch", 1), ("train.micro_batch", 1), ("train.seq_len", 2),
    ("train.ckpt_every", 1), ("train.ckpt_keep", 1), ("train.exit_after_steps", 0), ("train.log_every", 1),
    ("train.collective_timeout_s", 1.0), ("train.eval_every", 0), ("train.eval_batches", 1),
    ("optim.warmup_steps", 0), ("optim.decay_steps", 1), ("optim.weight_decay", 0.0), ("optim.grad_clip", 0.0),
    ("cluster.nodes", 1), ("cluster.gpus_per_node", 1), ("cluster.nvlink_gbps", 0.0), ("cluster.ib_gbps", 0.0),
]
POSITIVE = ["optim.lr", "optim.eps", "cluster.peak_tflops"]
UNIT_INTERVAL = ["optim.min_lr_ratio"]  # [0, 1]
BELOW_ONE = ["data.valid_fraction", "train.ema_decay"]  # [0, 1)
BETAS = ["optim.beta1", "optim.beta2"]  # [0, 1)


def model_config(cfg):
    """The spec of `model.arch` and the typed, validated model config (after `imports`)."""
    for module in cfg.get("imports") or []:  # absent in configs saved before the key existed
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"imports: cannot import {module!r} ({err}); check the name and that it is on "
                             "PYTHONPATH") from err
    if cfg.model is None or "arch" not in cfg.model:
        raise ValueError("model.arch is not set: choose a model preset (model=tiny) or set model.arch")
    spec = get_spec(cfg.model.arch)
    return spec, spec.config(cfg.model)


def typed_settings(cfg, model_cfg) -> RootConfig:
    """The validated config as typed dataclasses: a RootConfig whose `model` is the spec's typed
    model config (what the trainer works on; the DictConfig stays Hydra's)."""
    rest = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "model"}
    settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RootConfig), rest))
    settings.model = model_cfg
    return settings


def unknown_key_problems(cfg) -> list[str]:
    """Keys outside the schemas (the model's is checked by its spec)."""
    rest = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "model"}
    try:
        OmegaConf.merge(OmegaConf.structured(RootConfig), rest)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        return [f"{key}: {str(err).splitlines()[0]}; remove it or fix its spelling (`moetron-train --cfg job` "
                "prints every key)"]
    return []


def range_problems(cfg) -> list[str]:
    """Every numeric setting inside its range, named with its value and the bound."""
    problems = []

    def value(key):
        return OmegaConf.select(cfg, key)

    def bad(v) -> bool:
        return isinstance(v, float) and not math.isfinite(v)

    for key, low in AT_LEAST:
        v = value(key)
        if v is not None and (bad(v) or v < low):
            problems.append(f"{key}={v} must be at least {low}")
    for key in POSITIVE:
        v = value(key)
        if bad(v) or v <= 0:
            problems.append(f"{key}={v} must be positive")
    for key in UNIT_INTERVAL:
        v = value(key)
        if bad(v) or not 0 <= v <= 1:
            problems.append(f"{key}={v} must be in [0, 1]")
    for key in BETAS + BELOW_ONE:
        v = value(key)
        if bad(v) or not 0 <= v < 1:
            problems.append(f"{key}={v} must be in [0, 1)")
    return problems


def validate(cfg, world_size: int) -> ParallelDims:
    """Check a composed config against the world size; return the parallel dimensions."""
    problems = unknown_key_problems(cfg) + range_problems(cfg)
    spec, model = model_config(cfg)
    if problems:  # the checks below divide by these sizes
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    par, train = cfg.parallel, cfg.train
    if par.schedule not in BUILDERS:
        problems.append(f"parallel.schedule={par.schedule!r}: choose one of {sorted(BUILDERS)}")
    if par.dispatcher not in DISPATCHERS:
        problems.append(f"parallel.dispatcher={par.dispatcher!r}: choose one of {DISPATCHERS}")
    dp = par.dp if par.dp is not None else max(world_size // (par.pp * par.cp * par.ep), 1)
    dims = ParallelDims(pp=par.pp, dp=dp, ep=par.ep, cp=par.cp)
    if train.seq_len % (2 * par.cp):
        problems.append(f"train.seq_len={train.seq_len} cannot be cut into 2 x parallel.cp = {2 * par.cp} equal chunks "
                        f"(each cp rank holds an early and a late one): make it a multiple of {2 * par.cp}")
    topology = Topology.from_config(cfg.cluster, world_size)
    problems += dims.problems(world_size, topology)
    problems += spec.problems(model, dims, topology, train.seq_len)
    if par.dispatcher == "deepep" and dims.expert_ranks > 1:
        problems += deepep_problems(min(dims.expert_ranks, topology.gpus_per_node), dims.ep_nodes(topology))
    problems += _rl_problems(cfg, dims) if cfg.rl.algorithm is not None else _batch_problems(cfg, dims)
    for key, v in (("precision.compute_dtype", cfg.precision.compute_dtype),
                   ("precision.param_dtype", cfg.precision.param_dtype),
                   ("optim.moments_dtype", cfg.optim.moments_dtype)):
        if v not in DTYPES:
            problems.append(f"{key}={v!r}: choose one of {DTYPES[1:] if key.startswith('optim') else DTYPES}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what pick_device will choose
    if cfg.precision.compute_dtype in DTYPES and cfg.precision.param_dtype in DTYPES:
        problems += dtype_problems(cfg.precision, device)
    if cfg.precision.fp8:
        try:
            resolve_backend(cfg.precision.backend, device)
        except ValueError as err:
            problems.append(str(err))
        if cfg.precision.backend == "te" and _defers_weight_grads(cfg, dims):
            problems.append(f"precision.backend=te with parallel.schedule={par.schedule}: transformer-engine computes "
                            "weight gradients inside its backward, so the schedule's W actions cannot defer them; use "
                            "parallel.schedule=1f1b or interleaved_1f1b, or precision.backend=torch")
        if cfg.precision.fp8_dispatch and par.dispatcher == "deepep" and dims.expert_ranks > 1:
            problems.append("precision.fp8_dispatch=true: parallel.dispatcher=deepep sends BF16 only here; set "
                            "precision.fp8_dispatch=false or parallel.dispatcher=hierarchical")
    problems += _data_problems(cfg.data)
    if cfg.data.packing not in PACKINGS:
        problems.append(f"data.packing={cfg.data.packing!r}: choose one of {PACKINGS}")
    if cfg.data.overlong not in OVERLONG:
        problems.append(f"data.overlong={cfg.data.overlong!r}: choose one of {OVERLONG}")
    if train.epochs is not None and not (isinstance(train.epochs, (int, float)) and train.epochs > 0):
        problems.append(f"train.epochs={train.epochs} must be positive (or null: train.max_steps)")
    if train.max_steps is None and cfg.rl.algorithm is not None:
        problems.append("train.max_steps=null with rl.algorithm: give train.max_steps, the rollouts of the run")
    elif train.max_steps is None and train.epochs is None:
        problems.append("train.max_steps=null needs train.epochs (the steps then follow from the data): set one")
    if train.epochs is not None and train.batch_ramp:
        problems.append("train.epochs with train.batch_ramp: the steps of an epoch depend on the batch; set "
                        "train.batch_ramp=null or give train.max_steps")
    if train.eval_every > 0 and not cfg.data.valid_path and cfg.data.valid_fraction <= 0:
        problems.append("train.eval_every needs validation data: data.valid_path, or data.valid_fraction > 0")
    if train.eval_ema and not (train.ema_decay > 0 and train.eval_every > 0):
        problems.append("train.eval_ema=true needs train.ema_decay > 0 (the average) and train.eval_every > 0")
    problems += schedule_problems(OmegaConf.to_container(cfg.optim.schedule) if OmegaConf.is_config(cfg.optim.schedule)
                                  else cfg.optim.schedule)
    if cfg.logging.wandb.mode not in WANDB_MODES:
        problems.append(f"logging.wandb.mode={cfg.logging.wandb.mode!r}: choose one of {WANDB_MODES}")
    every = cfg.logging.heatmap_every
    if every and every % train.log_every:
        problems.append(f"logging.heatmap_every={every} is not a multiple of train.log_every={train.log_every}: "
                        "heatmaps go to W&B on logged steps only")
    problems += _profile_problems(cfg.logging.profile, train.max_steps, world_size)
    if train.on_nonfinite not in ("stop", "skip"):
        problems.append(f"train.on_nonfinite={train.on_nonfinite!r}: choose stop or skip")
    if cfg.optim.implementation not in ("auto", "torch", "apex"):
        problems.append(f"optim.implementation={cfg.optim.implementation!r}: choose auto, torch or apex")
    for key in ("mtp_weight_schedule", "bias_update_schedule"):
        schedule = getattr(train, key)
        if schedule is not None and (not schedule or any(len(point) != 2 for point in schedule) or schedule[0][0] != 0):
            problems.append(f"train.{key} must be [[0, value], [tokens, value], ...] in increasing tokens")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    return dims


def _defers_weight_grads(cfg, dims: ParallelDims) -> bool:
    """Whether the run's schedule has W actions (weight gradients deferred from B)."""
    par, train = cfg.parallel, cfg.train
    if par.pp == 1 or par.schedule not in BUILDERS:
        return False
    try:
        return splits_weight_grads(build_schedule(par.schedule, par.pp,
                                                  train.global_batch // (train.micro_batch * dims.dp * dims.ep)))
    except (MinimumMicrobatches, ZeroDivisionError, ValueError):
        return False  # said by the batch checks


def _rl_problems(cfg, dims: ParallelDims) -> list[str]:
    """rl.*: the algorithm, its numbers, and how a rollout splits over the data ranks and micro-batches."""
    rl, train = cfg.rl, cfg.train
    if rl.algorithm != "grpo":
        return [f"rl.algorithm={rl.algorithm!r}: choose grpo (or null: pre-training and SFT on token data)"]
    problems = []
    for key, lowest in (("group_size", 2), ("prompts_per_step", 1), ("max_new_tokens", 1), ("inner_steps", 1)):
        if getattr(rl, key) < lowest:
            problems.append(f"rl.{key}={getattr(rl, key)} must be at least {lowest}")
    if not rl.temperature > 0:
        problems.append(f"rl.temperature={rl.temperature}: GRPO samples (0 is greedy: a group's completions would "
                        "all be the same, with no advantage between them); use a positive temperature, e.g. 1.0")
    if not rl.clip_eps > 0 or rl.beta < 0:
        problems.append(f"rl.clip_eps={rl.clip_eps} must be positive and rl.beta={rl.beta} at least 0")
    split = " and ".join(f"parallel.{key}={size}" for key, size in (("pp", dims.pp), ("cp", dims.cp)) if size > 1)
    if split:
        problems.append(f"rl.algorithm=grpo samples its rollouts with the whole model and sequence on each rank: "
                        f"{split} must be 1 (use parallel.ep and data parallelism)")
    data_ranks = dims.dp * dims.ep
    if rl.prompts_per_step % data_ranks:
        problems.append(f"rl.prompts_per_step={rl.prompts_per_step} must be a multiple of dp x ep = {data_ranks} "
                        "(each data rank samples the groups of its own prompts)")
    elif (rl.prompts_per_step // data_ranks * rl.group_size) % train.micro_batch:
        per_rank = rl.prompts_per_step // data_ranks * rl.group_size
        problems.append(f"a data rank's {per_rank} completions (rl.prompts_per_step / (dp x ep) x rl.group_size) must "
                        f"be a multiple of train.micro_batch={train.micro_batch}; change one of them")
    for key, why in (("eval_every", "0 (a rollout's rewards are its evaluation)"),
                     ("epochs", "null (give train.max_steps: rollouts per run)"), ("batch_ramp", "null")):
        if getattr(train, key):
            problems.append(f"train.{key}={getattr(train, key)} with rl.algorithm=grpo: set it to {why}")
    return problems


def _data_problems(data) -> list[str]:
    if data.blend is None:
        return []
    entries = OmegaConf.to_container(data.blend) if OmegaConf.is_config(data.blend) else data.blend
    shape_ok = isinstance(entries, list) and entries and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], (int, float)) and isinstance(e[1], str) for e in entries)
    if not shape_ok:
        return [f"data.blend={entries!r} must be [[weight, path], ...], e.g. data.blend=[[0.7,data/a],[0.3,data/b]]"]
    problems = [f"data.blend: weight {w} of {p} must be positive" for w, p in entries if not w > 0]
    if data.path != "builtin":
        problems.append(f"data.path={data.path} and data.blend are both set: give the sources in data.blend only")
    return problems


def _batch_problems(cfg, dims: ParallelDims) -> list[str]:
    """Batch sizes (every one of a ramp) against the data ranks, and the micro-batches the schedule needs."""
    train = cfg.train
    ramp = OmegaConf.to_container(train.batch_ramp) if OmegaConf.is_config(train.batch_ramp) else train.batch_ramp
    problems = ramp_problems(train.global_batch, ramp)
    if problems:
        return problems
    for batch in ramp_batches(train.global_batch, ramp):
        problems = _one_batch_problems(cfg, dims, batch, "train.global_batch" if batch == train.global_batch
                                       else f"the ramp's batch {batch} (train.batch_ramp)")
        if problems:
            return problems
    return []


def _one_batch_problems(cfg, dims: ParallelDims, global_batch: int, what: str) -> list[str]:
    par, train = cfg.parallel, cfg.train
    data_ranks = dims.dp * dims.ep  # each dp x ep rank of a stage reads its own sequences
    if global_batch % (train.micro_batch * data_ranks):
        return [f"{what}={global_batch} must be a multiple of train.micro_batch x dp x ep = "
                f"{train.micro_batch} x {dims.dp} x {dims.ep}"]
    if par.pp == 1 or par.schedule not in BUILDERS:
        return []
    num_microbatches = global_batch // (train.micro_batch * data_ranks)
    try:
        schedule = build_schedule(par.schedule, par.pp, num_microbatches)
    except MinimumMicrobatches as err:
        return [f"{err}: each pipeline gets {what.split('=')[0]} / (train.micro_batch x dp x ep) = "
                f"{num_microbatches} micro-batches; raise train.global_batch or lower train.micro_batch"]
    if par.layout and len(par.layout) != schedule.num_modules:
        return [f"parallel.layout lists {len(par.layout)} stages, but {par.schedule} on parallel.pp={par.pp} "
                f"ranks cuts the model into {schedule.num_modules}"]
    return []


def _profile_problems(profile, max_steps: Optional[int], world_size: int) -> list[str]:
    if not profile.enabled:
        return []
    problems = []
    if profile.start_step < 1 or profile.num_steps < 1:
        problems.append(f"logging.profile.start_step={profile.start_step} and logging.profile.num_steps="
                        f"{profile.num_steps} must be >= 1")
    elif max_steps is not None and profile.start_step + profile.num_steps - 1 > max_steps:
        problems.append(f"logging.profile: steps {profile.start_step}-{profile.start_step + profile.num_steps - 1} "
                        f"run past train.max_steps={max_steps}; lower logging.profile.start_step or num_steps")
    outside = [r for r in profile.ranks if not 0 <= r < world_size]
    if outside:
        problems.append(f"logging.profile.ranks has {outside}, outside the {world_size} rank(s) of this run; "
                        f"use ranks 0-{world_size - 1}, or [] for all")
    return problems

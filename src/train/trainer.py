"""`moetron-train`'s run: validate (one process, before any process group), start the process
groups, build this rank's part of the model, resume, then the loop (moetron.train.loop).

The trainer names no model: the spec of `model.arch` (moetron.models.registry) builds it,
parallelizes it (module converters: FP8, weight-gradient deferral, recomputation; expert
parallelism), cuts it into pipeline stages, gives the loss options of a step, and runs its hooks
after the optimizer step. What this rank holds is allocated (moetron.parallel.materialize), then the
step finalizer and its gradient buffers (moetron.parallel.finalize), wired to the micro-batch runner
so that buckets reduce as their gradients become final.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import random
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from moetron.checkpoint import folders
from moetron.checkpoint.run_lock import RunDirInUse, RunLock
from moetron.checkpoint.run_state import resume
from moetron.core.errors import UserInputError
from moetron.data.tokenizers import get_tokenizer
from moetron.data.windows import build_data
from moetron.models.common.context_parallel import SequenceSplit
from moetron.parallel.dims import Topology, build_groups
from moetron.parallel.finalize import StepFinalizer
from moetron.parallel.materialize import materialize
from moetron.parallel.weight_grads import deferred_parameters
from moetron.pipeline.builders import build_schedule, comm_lanes
from moetron.pipeline.grads_final import gradient_order
from moetron.pipeline.schedule import splits_weight_grads
from moetron.precision.convert import FP8Recipe
from moetron.precision.dtypes import compute_dtype, param_dtype
from moetron.precision.fp8_gemm import resolve_backend
from moetron.train.distributed import init_process_group, pick_device, world_from_env
from moetron.train.ema import FrozenReference, ParameterEMA
from moetron.train.grpo_loop import GRPOLoop, grpo_inputs
from moetron.train.grpo_micro_batches import GRPOMicroBatches
from moetron.train.loop import Built, TrainingLoop
from moetron.train.micro_batches import LocalMicroBatches, PipelinedMicroBatches, stage_parameters
from moetron.train.optim import build_optimizer, param_groups
from moetron.train.validate import model_config, typed_settings, validate


@dataclasses.dataclass
class Checked:
    """What `check` found a composed config to mean: the layout, the model and the data."""
    dims: Any
    topology: Topology
    spec: Any
    model_cfg: Any
    sampler: Any  # None under rl.algorithm
    valid: Any
    rl: Any = None  # moetron.train.grpo_loop.GRPOInputs under rl.algorithm=grpo


def check(cfg, run_dir: Optional[Path], world_size: int) -> Checked:
    """Everything a user can get wrong, checked in one process before any process group starts (by
    every rank at its start, and once by `moetron-train --check` before a launcher starts ranks);
    raises UserInputError naming the key and the fix. `run_dir` None: not known yet (its checks wait
    for the run)."""
    held = folders.step_dirs(run_dir / "checkpoints") if run_dir is not None else []
    if cfg.train.resume and held and cfg.model.get("init_from"):
        cfg.model.init_from = None  # a run that resumes starts from its checkpoint, not from model.init_from
    try:
        dims = validate(cfg, world_size)
        topology = Topology.from_config(cfg.cluster, world_size)
        spec, model_cfg = model_config(cfg)
        tokenizer = get_tokenizer(cfg.data.tokenizer)
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the {cfg.data.tokenizer!r} "
                             f"tokenizer's {tokenizer.vocab_size} tokens; raise model.vocab_size")
        sampler = valid = rl = None
        if cfg.rl.algorithm is not None:  # rollouts instead of token data
            rl = grpo_inputs(cfg, tokenizer)
        else:
            sampler, valid = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed, tokenizer, model_cfg.vocab_size)
            _steps_from_data(cfg, sampler)
        if not cfg.train.resume and held:
            raise ValueError(f"train.resume=false, but {run_dir} holds checkpoints of an earlier run: starting over "
                             "there would mix the two runs' metrics and checkpoints; use a new hydra.run.dir")
    except (ValueError, FileNotFoundError) as err:
        raise UserInputError(str(err)) from err
    return Checked(dims, topology, spec, model_cfg, sampler, valid, rl)


def _steps_from_data(cfg, sampler) -> None:
    """train.epochs: train.max_steps becomes the steps of that many passes over the (packed) data,
    or stays where it was set lower (it stops the run sooner); optim.decay_steps unset: the cosine
    ends at train.max_steps."""
    tcfg = cfg.train
    if tcfg.get("epochs"):
        part = sampler.blend.parts[0]
        if len(sampler.blend.parts) > 1 or not hasattr(part, "rows_in_epochs"):
            raise ValueError("train.epochs counts passes over one chat file (moetron-data --chat); give "
                             "train.max_steps for token files and blends")
        rows = part.rows_in_epochs(tcfg.epochs)
        if rows < tcfg.global_batch:
            raise ValueError(f"train.epochs={tcfg.epochs}: {part.source.path} packs into {rows} rows of "
                             f"train.seq_len={tcfg.seq_len}, fewer than one train.global_batch={tcfg.global_batch}")
        epoch_steps = rows // tcfg.global_batch
        tcfg.max_steps = epoch_steps if tcfg.max_steps is None else min(tcfg.max_steps, epoch_steps)
    if cfg.optim.get("decay_steps") is None:
        cfg.optim.decay_steps = tcfg.max_steps


def train(cfg, run_dir: Path) -> dict:
    """Run training as `cfg` says, in `run_dir`; returns the last step's metrics (on every rank)."""
    world = world_from_env()
    checked = check(cfg, run_dir, world.size)
    dims, topology, spec, model_cfg = checked.dims, checked.topology, checked.spec, checked.model_cfg
    config = OmegaConf.to_container(cfg, resolve=True)  # as the user composed it: saved in checkpoints, logged
    cfg = typed_settings(cfg, model_cfg)  # from here on, typed settings

    device = pick_device(world)
    world_group = init_process_group(world, device, cfg.train.collective_timeout_s)
    lock = None
    try:
        run_dir = _agree_on_run_dir(run_dir, world)
        lock = _hold_run_dir(run_dir, world)
        lanes = comm_lanes(cfg.parallel.schedule, dims.pp, cfg.parallel.overlap_fb)
        ordered = cfg.parallel.ordered_issue
        if ordered is None:  # NCCL's kernels block until all members join: one issue order on every rank
            ordered = world_group is not None and torch.distributed.get_backend() == "nccl"
        timeout = timedelta(seconds=cfg.train.collective_timeout_s)  # every group: new ones do not inherit it
        groups = build_groups(dims, topology, world.rank, lanes, ordered, timeout)
        if world.is_main and world.size > 1:
            print(dims.placement(topology), flush=True)
            if lanes > 1:
                how = "in turns, one order on every rank" if groups.order else "as each half reaches them"
                print(f"F&B pairs overlap; their collectives are issued {how}", flush=True)
        return _train_loop(cfg, config, run_dir, world, groups, device, spec, checked.sampler, checked.valid,
                           checked.rl)
    finally:
        if lock is not None:
            lock.release()
        if world_group is not None:
            torch.distributed.destroy_process_group()


def _hold_run_dir(run_dir: Path, world) -> Optional[RunLock]:
    """Rank 0 takes the run directory's lock for the run's life (moetron.checkpoint.run_lock); if a
    live run holds it, every rank raises UserInputError naming that run."""
    lock, refusal = None, None
    if world.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunDirInUse as err:
            refusal = str(err)
        except OSError as err:
            if err.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):  # a mount without locks
                print(f"moetron-train: warning: {run_dir}'s file system refuses locks ({err.strerror}): "
                      "nothing stops a second run in this folder", flush=True)
            else:
                refusal = f"cannot use the run directory {run_dir}: {err}; choose another hydra.run.dir"
    if world.size > 1:
        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise UserInputError(refusal)
    return lock


def _agree_on_run_dir(run_dir: Path, world) -> Path:
    """Rank 0's run directory, on every rank. Hydra names its default folder after the second a
    process starts, so the ranks of one job may each have made their own; all follow rank 0, which
    alone removes the other folders that hold nothing but Hydra's own files."""
    if world.size == 1:
        return run_dir
    dirs = [None] * world.size
    torch.distributed.all_gather_object(dirs, str(run_dir))
    if world.is_main:
        for other in {Path(d) for d in dirs} - {run_dir}:
            try:
                if all(p.name == ".hydra" or (p.suffix == ".log" and p.stat().st_size == 0) for p in other.iterdir()):
                    shutil.rmtree(other)  # .hydra/ and Hydra's empty job log: nothing of the user's
            except OSError:
                pass  # gone already, or not ours to remove
    return Path(dirs[0])


def _build(cfg, groups, device, spec, model_cfg, num_microbatches: int):
    """The model on the meta device, parallelized; this rank's stages (under pp); only what this rank
    holds allocated and initialised; its micro-batch runner and step finalizer."""
    dims, par = groups.dims, cfg.parallel
    overlap_reduce = _on_gpus(par.overlap_grad_reduce, device)
    model = spec.build(model_cfg, device="meta").train()
    prec = cfg.precision
    fp8 = FP8Recipe(resolve_backend(prec.backend, device), prec.fp8_dispatch, prec.fp8_cache_activations) \
        if prec.fp8 else None
    recompute = dataclasses.asdict(cfg.recompute)
    defer = dims.pp > 1 and splits_weight_grads(build_schedule(par.schedule, dims.pp, num_microbatches))
    made = spec.parallelize(model, groups, par.dispatcher, defer_weights=defer, fp8=fp8, recompute=recompute,
                            memory=dataclasses.asdict(cfg.memory))
    if cfg.train.compile:
        spec.compile_blocks(model, cfg.train.compile_backend)  # compiled at first call, on materialized weights
    if dims.pp == 1:
        materialize(model, [model], device, cfg.train.seed)
        _init_from(spec, model_cfg, model, groups)
        finalizer = StepFinalizer(model, made.expert_params, groups, cfg.optim.grad_clip, zero1=_zero1(cfg, dims),
                                  overlap_param_gather=_on_gpus(par.overlap_param_gather, device),
                                  overlap_grad_reduce=overlap_reduce, param_dtype=param_dtype(prec, device))
        runner = GRPOMicroBatches if cfg.rl.algorithm else LocalMicroBatches
        micro = runner(model, device, compute_dtype(cfg.precision, device), finalizer if overlap_reduce else None)
        micro.split = _sequence_split(groups)
        return model, made, micro, finalizer
    schedule = build_schedule(par.schedule, dims.pp, num_microbatches)
    layout = [list(ids) for ids in par.layout] if par.layout else None
    parts = spec.pipeline_split(model, schedule, groups.pp_rank, layout, num_microbatches)
    materialize(model, parts.held_modules, device, cfg.train.seed)
    _init_from(spec, model_cfg, model, groups)
    p2p_shape = spec.activation_shape(model_cfg, cfg.train.micro_batch, cfg.train.seq_len // dims.cp)  # my tokens
    schedule_for = functools.partial(build_schedule, par.schedule, dims.pp)  # a batch-size ramp changes the count
    stage_params = stage_parameters(schedule, parts)
    deferred = deferred_parameters(model, made.weight_grad_store)
    finalizer = StepFinalizer(model, made.expert_params, groups, cfg.optim.grad_clip, parts.holders, parts.shared,
                              zero1=_zero1(cfg, dims), overlap_param_gather=_on_gpus(par.overlap_param_gather, device),
                              overlap_grad_reduce=overlap_reduce,
                              grad_order=gradient_order(schedule.actions[groups.pp_rank], stage_params, deferred),
                              param_dtype=param_dtype(prec, device))
    if overlap_reduce and made.weight_grad_store is not None:  # W actions add gradients outside autograd
        made.weight_grad_store.on_accumulated = finalizer.grad_accumulated
    micro = PipelinedMicroBatches(schedule_for, parts, groups.pp_rank, groups.lanes("pp"), p2p_shape, device,
                                  compute_dtype(cfg.precision, device), par.overlap_fb, made.weight_grad_store,
                                  finalizer if overlap_reduce else None, stage_params, deferred,
                                  p2p_dtype=param_dtype(prec, device))
    micro.split = _sequence_split(groups)
    return model, made, micro, finalizer


def _sequence_split(groups) -> Optional[SequenceSplit]:
    """parallel.cp > 1: how this rank takes its share of every row (its cp group's lanes, as the
    pipeline's and EP's, so that DualPipe's overlapped halves keep one order per lane)."""
    cp = groups.dims.cp
    return SequenceSplit(groups.lanes("cp"), groups.cp_rank, cp) if cp > 1 else None


def _init_from(spec, model_cfg, model, groups) -> None:
    """model.init_from: the weights of a Hugging Face folder, into what this rank holds (reading
    only those tensors: its pipeline stages, its experts' rows)."""
    folder = getattr(model_cfg, "init_from", None)
    if folder:
        read, total = spec.read_hf(model_cfg, folder, model)
        if groups.rank == 0:
            print(f"model.init_from: rank 0 read {read / 2**20:.1f} MiB of {folder}'s {total / 2**20:.1f} MiB",
                  flush=True)


def _packing_note(sampler, cfg) -> str:
    """What the chat data became: conversations, rows per epoch, what was cut."""
    parts = sampler.blend.parts
    samples, rows = sum(len(p.sample_ids) for p in parts), sum(p.num_windows for p in parts)
    cut = sum(p.overlong_count for p in parts)
    line = (f"chat data: {samples:,} conversations packed ({cfg.data.packing}) into {rows:,} rows of "
            f"train.seq_len={cfg.train.seq_len} per epoch, each attending only to itself; "
            f"{cfg.train.max_steps} steps")
    if cfg.train.epochs:
        line += f" (train.epochs={cfg.train.epochs:g}, or train.max_steps where that is fewer)"
    if cut:
        line += f"; {cut} conversation(s) longer than train.seq_len cut to it (data.overlong=truncate)"
    return line


def _on_gpus(setting, device: torch.device) -> bool:
    """An overlap setting, or (unset) on with GPUs and off on CPUs, where gloo's threads take cores
    from compute (on 2 cores, ZeRO-1's overlapped communication was 3% slower: BENCHMARKS.md)."""
    return setting if setting is not None else device.type == "cuda"


def _zero1(cfg, dims) -> bool:
    """parallel.zero1, or (unset) on whenever dp > 1."""
    return cfg.parallel.zero1 if cfg.parallel.zero1 is not None else dims.dp > 1


def _train_loop(cfg, config_dict: dict, run_dir, world, groups, device, spec, sampler, valid, rl_inputs) -> dict:
    """Seed, build, resume, then the loop (moetron.train.loop; GRPO's, moetron.train.grpo_loop, with
    `rl_inputs`). `cfg`: the typed settings; `config_dict`: the composed config as a dict (saved with
    checkpoints, sent to W&B)."""
    tcfg = cfg.train
    deterministic = tcfg.deterministic if tcfg.deterministic is not None else device.type == "cpu"
    torch.use_deterministic_algorithms(deterministic)
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    num_microbatches = tcfg.global_batch // (tcfg.micro_batch * groups.dims.data_ranks)  # at the full batch
    model, made, micro, finalizer = _build(cfg, groups, device, spec, cfg.model, num_microbatches)
    optimizer = build_optimizer(param_groups(model, cfg.optim.weight_decay, finalizer.stepped_on), cfg.optim, device)
    ema = ParameterEMA(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    reference = FrozenReference(model) if cfg.rl.algorithm and cfg.rl.beta > 0 else None  # the starting weights
    built = Built(model, made, micro, finalizer, optimizer, ema, None, reference)
    progress = built.progress = resume(run_dir, config_dict, spec, cfg.model, model, optimizer, finalizer,
                                       built.copies())  # step, tokens, skips
    if world.is_main and progress.step:
        print(f"resuming from {run_dir / 'checkpoints'} at step {progress.step}", flush=True)
    if world.is_main and sampler is not None and sampler.packed:
        print(_packing_note(sampler, cfg), flush=True)
    if progress.step >= tcfg.max_steps:
        if world.is_main:
            print(f"nothing to do: {run_dir} already reached train.max_steps={tcfg.max_steps} "
                  "(raise train.max_steps to train on)", flush=True)
        return {}
    if rl_inputs is not None:
        return GRPOLoop(cfg, config_dict, run_dir, world, groups, device, spec, None, None, built,
                        inputs=rl_inputs).run()
    return TrainingLoop(cfg, config_dict, run_dir, world, groups, device, spec, sampler, valid, built).run()

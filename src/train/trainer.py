"""The training loop of `moetron-train`: validate, build, resume, step, log, checkpoint.

The trainer names no model: the spec of `model.arch` (moetron.models.registry) builds it,
parallelizes it, cuts it into pipeline stages, gives the loss options of a step, and runs its hooks
after the optimizer step. One optimizer step:

1. this rank's micro-batches run forward and backward: the whole model, or its pipeline stages
   under the schedule; each micro-batch loss scaled by 1 / micro-batches; the loss terms come back
   as values (moetron.train.micro_batches);
2. the step finalizer (moetron.parallel.finalize) averages gradients over data- and expert-parallel
   ranks, sums them where pipeline ranks share a parameter, and clips by the whole model's norm;
3. AdamW steps;
4. the step's metrics (loss terms, bubble, all-to-all bytes, the spec's statistics: MoE loads and
   biases) are summed over all ranks in one all-reduce; the spec's hook updates the routers'
   loss-free biases from the loads; rank 0 logs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random
import shutil
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from moetron.comm.packed import all_reduce_packed
from moetron.models.outputs import named_losses
from moetron.parallel.dims import Topology, build_groups
from moetron.parallel.finalize import StepFinalizer
from moetron.parallel.materialize import load_whole_state_dict, materialize
from moetron.pipeline.builders import build_schedule, comm_lanes
from moetron.pipeline.grads_final import gradient_order
from moetron.pipeline.schedule import splits_weight_grads
from moetron.pipeline.timeline import save_rank_timeline
from moetron.precision.convert import FP8Recipe
from moetron.precision.fp8_gemm import resolve_backend
from moetron.profiling import StepProfiler
from moetron.train import checkpoint
from moetron.train.batch_ramp import global_batch_at
from moetron.train.data import build_data
from moetron.train.ema import ParameterEMA
from moetron.train.evaluate import evaluate
from moetron.train.distributed import init_process_group, pick_device, world_from_env
from moetron.train.tokenizers import get_tokenizer
from moetron.train.errors import UserInputError
from moetron.train.interrupts import StopRequests, TrainingStopped, first_nonfinite_gradient, is_timeout
from moetron.train.metrics import Console, JsonlWriter, WandbLogger, peak_memory_gib
from moetron.train.micro_batches import LocalMicroBatches, PipelinedMicroBatches, stage_parameters
from moetron.train.lr_schedule import lr_at
from moetron.train.optim import build_optimizer, optimizer_state_gib, param_groups
from moetron.train.run_state import resume, save
from moetron.train.validate import model_config, typed_settings, validate


def _compute_dtype(cfg, device: torch.device) -> torch.dtype:
    name = cfg.precision.compute_dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return getattr(torch, name)


def train(cfg, run_dir: Path) -> dict:
    """Run training as `cfg` says, in `run_dir`; returns the last step's metrics (on every rank)."""
    world = world_from_env()
    if cfg.train.resume and checkpoint.step_dirs(run_dir / "checkpoints") and cfg.model.get("init_from"):
        cfg.model.init_from = None  # a run that resumes starts from its checkpoint, not from model.init_from
    try:  # everything a user can get wrong is checked here, before any process group starts
        dims = validate(cfg, world.size)
        topology = Topology.from_config(cfg.cluster, world.size)
        spec, model_cfg = model_config(cfg)
        tokenizer = get_tokenizer(cfg.data.tokenizer)
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the {cfg.data.tokenizer!r} "
                             f"tokenizer's {tokenizer.vocab_size} tokens; raise model.vocab_size")
        sampler, valid = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed, tokenizer, model_cfg.vocab_size)
        if not cfg.train.resume and checkpoint.step_dirs(run_dir / "checkpoints"):
            raise ValueError(f"train.resume=false, but {run_dir} holds checkpoints of an earlier run: starting over "
                             "there would mix the two runs' metrics and checkpoints; use a new hydra.run.dir")
    except (ValueError, FileNotFoundError) as err:
        raise UserInputError(str(err)) from err
    config = OmegaConf.to_container(cfg, resolve=True)  # as the user composed it: saved in checkpoints, logged
    cfg = typed_settings(cfg, model_cfg)  # from here on, typed settings

    device = pick_device(world)
    world_group = init_process_group(world, device, cfg.train.collective_timeout_s)
    try:
        run_dir = _agree_on_run_dir(run_dir, world)
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
        return _train_loop(cfg, config, run_dir, world, groups, device, spec, sampler, valid)
    finally:
        if world_group is not None:
            torch.distributed.destroy_process_group()


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
    made = spec.parallelize(model, groups, par.dispatcher, defer_weights=defer, fp8=fp8, recompute=recompute)
    if cfg.train.compile:
        spec.compile_blocks(model, cfg.train.compile_backend)  # compiled at first call, on materialized weights
    if dims.pp == 1:
        materialize(model, [model], device, cfg.train.seed)
        _init_from(spec, model_cfg, model)
        finalizer = StepFinalizer(model, made.expert_params, groups, cfg.optim.grad_clip, zero1=_zero1(cfg, dims),
                                  overlap_param_gather=_on_gpus(par.overlap_param_gather, device),
                                  overlap_grad_reduce=overlap_reduce)
        micro = LocalMicroBatches(model, device, _compute_dtype(cfg, device), finalizer if overlap_reduce else None)
        return model, made, micro, finalizer
    schedule = build_schedule(par.schedule, dims.pp, num_microbatches)
    layout = [list(ids) for ids in par.layout] if par.layout else None
    parts = spec.pipeline_split(model, schedule, groups.pp_rank, layout, num_microbatches)
    materialize(model, parts.held_modules, device, cfg.train.seed)
    _init_from(spec, model_cfg, model)
    p2p_shape = spec.activation_shape(model_cfg, cfg.train.micro_batch, cfg.train.seq_len)
    schedule_for = functools.partial(build_schedule, par.schedule, dims.pp)  # a batch-size ramp changes the count
    stage_params = stage_parameters(schedule, parts)
    deferred = frozenset(id(p) for p in made.deferred_params)
    finalizer = StepFinalizer(model, made.expert_params, groups, cfg.optim.grad_clip, parts.holders, parts.shared,
                              zero1=_zero1(cfg, dims), overlap_param_gather=_on_gpus(par.overlap_param_gather, device),
                              overlap_grad_reduce=overlap_reduce,
                              grad_order=gradient_order(schedule.actions[groups.pp_rank], stage_params, deferred))
    if overlap_reduce and made.weight_grad_store is not None:  # W actions add gradients outside autograd
        made.weight_grad_store.on_accumulated = finalizer.grad_accumulated
    micro = PipelinedMicroBatches(schedule_for, parts, groups.pp_rank, groups.lanes("pp"), p2p_shape, device,
                                  _compute_dtype(cfg, device), par.overlap_fb, made.weight_grad_store,
                                  finalizer if overlap_reduce else None, stage_params, deferred)
    return model, made, micro, finalizer


def _init_from(spec, model_cfg, model) -> None:
    """model.init_from: the weights of a Hugging Face folder, into what this rank holds."""
    folder = getattr(model_cfg, "init_from", None)
    if folder:
        load_whole_state_dict(model, spec.load_hf(model_cfg, folder))


def _on_gpus(setting, device: torch.device) -> bool:
    """An overlap setting, or (unset) on with GPUs and off on CPUs, where gloo's threads take cores
    from compute (on 2 cores, ZeRO-1's overlapped communication was 3% slower: BENCHMARKS.md)."""
    return setting if setting is not None else device.type == "cuda"


def _zero1(cfg, dims) -> bool:
    """parallel.zero1, or (unset) on whenever dp > 1."""
    return cfg.parallel.zero1 if cfg.parallel.zero1 is not None else dims.dp > 1


def _train_loop(cfg, config_dict: dict, run_dir, world, groups, device, spec, sampler, valid) -> dict:
    """`cfg`: the typed settings (RootConfig, `cfg.model` the spec's config); `config_dict`: the
    composed config as a dict (saved with checkpoints, sent to W&B)."""
    tcfg, model_cfg = cfg.train, cfg.model
    deterministic = tcfg.deterministic if tcfg.deterministic is not None else device.type == "cpu"
    torch.use_deterministic_algorithms(deterministic)
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    dims = groups.dims
    data_ranks = dims.dp * dims.ep  # every dp x ep rank of the stage reads its own sequences
    ramp = tcfg.batch_ramp
    num_microbatches = tcfg.global_batch // (tcfg.micro_batch * data_ranks)  # at the full batch
    model, made, micro, finalizer = _build(cfg, groups, device, spec, model_cfg, num_microbatches)
    optimizer = build_optimizer(param_groups(model, cfg.optim.weight_decay, finalizer.stepped_on), cfg.optim, device)
    ema = ParameterEMA(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    progress = resume(run_dir, config_dict, spec, model_cfg, model, optimizer, finalizer, ema)  # step, tokens, skipped steps
    start_step = progress.step
    if world.is_main and start_step:
        print(f"resuming from {run_dir / 'checkpoints'} at step {start_step}", flush=True)
    if start_step >= tcfg.max_steps:
        if world.is_main:
            print(f"nothing to do: {run_dir} already reached train.max_steps={tcfg.max_steps} "
                  "(raise train.max_steps to train on)", flush=True)
        return {}

    flops_per_token = spec.flops_per_token(model_cfg, tcfg.seq_len)  # from the config: the same in every layout
    loss_names = spec.loss_metrics(model_cfg)
    end_step = tcfg.max_steps if not tcfg.exit_after_steps else min(tcfg.max_steps, start_step + tcfg.exit_after_steps)
    jsonl = wandb = console = None
    if world.is_main:
        jsonl = JsonlWriter(run_dir / "metrics.jsonl", start_step)
        wandb = WandbLogger(cfg.logging.wandb, run_dir, config_dict, start_step, cfg.logging.heatmap_every)
        console = Console(cfg.logging.progress, start_step, tcfg.max_steps, tcfg.log_every)

    metrics, first_loss, step = {}, None, start_step
    profiler = StepProfiler(cfg.logging.profile, world.rank, run_dir, device)
    optimizer_gib = None  # this rank's optimizer state and master weights
    with StopRequests() as stops:  # SIGTERM / SIGUSR1 / SIGINT: finish the step, checkpoint, exit
        try:
            for step in range(start_step, end_step):
                phase = "forward_backward"  # named if a peer stops answering (_PHASES)
                profiler.begin(step + 1)
                t0 = time.perf_counter()
                lr = lr_at(step, progress.tokens, cfg.optim)
                for group_ in optimizer.param_groups:
                    group_["lr"] = lr
                batch = global_batch_at(progress.tokens, tcfg.global_batch, ramp)  # sequences in this step
                tokens_per_step, first = batch * tcfg.seq_len, progress.tokens // tcfg.seq_len
                batches = list(sampler.micro_batches(first, batch, tcfg.micro_batch, groups.dp_ep_rank, data_ranks))
                loss_sums = micro.run(batches, spec.loss_options(model_cfg, tcfg, progress.tokens))
                phase = "gradients"
                grad_norm = finalizer.finish_gradients()
                finite = math.isfinite(grad_norm)  # reduced over every rank: all of them agree
                if not finite and tcfg.on_nonfinite == "stop":
                    raise TrainingStopped(f"step {step + 1}: the gradient norm is {grad_norm}; the first non-finite "
                                          f"gradient on rank {world.rank} is {first_nonfinite_gradient(model)}. No "
                                          "checkpoint was written from it; lower optim.lr, or train.on_nonfinite=skip")
                if finite:
                    optimizer.step()
                    if optimizer_gib is None:  # the state exists after the first step, and keeps its size
                        optimizer_gib = optimizer_state_gib(optimizer)
                progress.skipped_steps += not finite  # train.on_nonfinite=skip: a non-finite gradient norm
                finalizer.after_optimizer_step(gather=finite)  # ZeRO-1: gather the updated shards; no gradients left
                if ema is not None and finite:
                    finalizer.finish_gather()  # the average reads the updated parameters
                    ema.update()  # copied now, blended in on a worker thread
                phase = "metrics"
                parts = _step_parts(loss_sums, micro, made, spec, model, device)
                parts["stop"] = stops.flag(device)
                summed = all_reduce_packed(parts, world_size=world.size)
                stop_now = float(summed.pop("stop")) > 0
                extra = spec.after_step(model, summed, tcfg, progress.tokens, update=finite)
                progress.tokens += tokens_per_step
                step_time = time.perf_counter() - t0

                metrics = _step_metrics(step + 1, progress.tokens, lr, grad_norm, step_time, tokens_per_step,
                                        flops_per_token, world.size, cfg, device)
                metrics.update(_reduced_metrics(summed, loss_names, len(batches) * data_ranks, world.size))
                metrics["train/global_batch"] = batch
                metrics.update(extra)
                if len(sampler.blend.parts) > 1:  # each source's share of this step's sequences
                    shares = sampler.blend.shares(first, batch)
                    metrics.update({f"data/share/{name}": share for name, share in shares.items()})
                if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0:
                    phase = "metrics"
                    with ema.swapped_in() if tcfg.eval_ema else nullcontext():
                        metrics.update(evaluate(micro, world.size, valid,
                                                spec.loss_options(model_cfg, tcfg, progress.tokens), loss_names, tcfg,
                                                groups.dp_ep_rank, data_ranks))
                gib = optimizer_gib if optimizer_gib is not None else optimizer_state_gib(optimizer)
                metrics.update({"memory/optimizer_state_gib": gib, "train/skipped_steps": progress.skipped_steps})
                first_loss = metrics["loss"] if first_loss is None else first_loss
                if world.is_main:
                    if (step + 1) % tcfg.log_every == 0 or step + 1 == end_step:
                        jsonl.log(metrics)
                        wandb.log(metrics, step + 1)
                    console.update(metrics)
                if cfg.logging.timeline and dims.pp > 1 and step + 1 == cfg.logging.timeline_step \
                        and groups.dp_ep_rank == 0:  # one pipeline's ranks
                    runner = micro.last_runner
                    save_rank_timeline(run_dir / "timeline" / f"rank{groups.pp_rank}.json", runner.action_spans,
                                       runner.step_started, runner.sched, step + 1, groups.pp_rank)
                trace = profiler.end(step + 1)
                if trace is not None:
                    line = f"rank {world.rank}: profile of {profiler.steps} in {trace}"
                    if console is not None:
                        console.note(line)
                    else:
                        print(line, flush=True)
                phase = "checkpoint"
                if (step + 1) % tcfg.ckpt_every == 0 or step + 1 == end_step or stop_now:
                    finalizer.finish_gather()  # ZeRO-1: the parameters as the optimizer left them
                    save(run_dir, step + 1, progress, model, optimizer, finalizer, config_dict, tcfg.ckpt_keep, world,
                         groups, ema)
                if stop_now:
                    if world.is_main:
                        how = stops.signal_name or "a stop signal on another rank"
                        (console.note if console else print)(
                            f"stopped by {how} after step {step + 1}, checkpoint written in {run_dir / 'checkpoints'}; "
                            "run the same command to resume")
                    break
        except RuntimeError as err:
            if not is_timeout(err):
                raise
            what, group_names = _PHASES[phase]
            if phase == "forward_backward" and (finalizer.overlap_gather or finalizer.overlap_reduce):
                group_names = [*group_names, "dp_ep", "edp"]  # overlapped gradient reductions and ZeRO-1 gathers run there too
            raise TrainingStopped(f"step {step + 1}: rank {world.rank} had no answer from a peer within "
                                  f"train.collective_timeout_s={tcfg.collective_timeout_s:g} s during {what} "
                                  f"(its collectives here: {groups.describe(group_names)}): a rank is dead or hung "
                                  f"(see its log). torch: {str(err).splitlines()[0]}") from err
        finally:
            profiler.close()
            if ema is not None:
                ema.close()
            if world.is_main:
                summary = None
                if metrics:
                    maxvio = f", MaxVio {metrics['moe/maxvio_batch']:.3f}" if "moe/maxvio_batch" in metrics else ""
                    summary = (f"done: step {metrics['step']}/{tcfg.max_steps}, loss {first_loss:.4f} -> {metrics['loss']:.4f}, "
                               f"{metrics['throughput/tokens_per_s']:.0f} tokens/s{maxvio}; run dir {run_dir}")
                console.close(summary)
                jsonl.close()
                wandb.close()
    return metrics


# phase of a step -> (its name in messages, the process groups its collectives use: ParallelGroups.members)
_PHASES = {"forward_backward": ("the forward and backward passes", ["ep", "pp"]),
           "gradients": ("the gradient reduction", ["dp_ep", "edp", "ep", "pp"]),
           "metrics": ("the metrics reduction", ["world"]),
           "checkpoint": ("writing a checkpoint", ["world"])}


def _step_parts(loss_sums, micro, made, spec, model, device) -> dict:
    """This rank's metrics of the step, to be summed over all ranks in one collective."""
    parts = {"losses": loss_sums}
    if micro.idle is not None:
        parts["idle"] = micro.idle
    if made.traffic is not None:
        moved = made.traffic.take()  # bytes the forward dispatch and combine sent, by link class
        parts["a2a_bytes"] = torch.tensor([moved["ib"], moved["nvlink"]], dtype=torch.float64, device=device)
    parts.update(spec.step_stats(model, device))
    return parts


def _step_metrics(step, tokens, lr, grad_norm, step_time, tokens_per_step, flops_per_token, world_size, cfg,
                  device) -> dict:
    tokens_per_s = tokens_per_step / step_time
    tflops_per_rank = tokens_per_s * flops_per_token / world_size / 1e12
    return {"step": step, "tokens": tokens, "lr": lr, "grad_norm": grad_norm,
            "throughput/tokens_per_s": tokens_per_s, "throughput/tflops": tflops_per_rank,
            "throughput/mfu": tflops_per_rank / cfg.cluster.peak_tflops, "step_time_s": step_time,
            "memory/peak_gib": peak_memory_gib(device)}


def _reduced_metrics(summed: dict, loss_names: dict, loss_count: int, world_size: int) -> dict:
    """The trainer's own parts of the step's summed metrics (`_step_parts`), as logged values."""
    # each pipeline rank summed its part of its micro-batches' losses: / (micro-batches x dp x ep)
    losses = summed.pop("losses") / loss_count
    metrics = named_losses(losses, loss_names)
    if "a2a_bytes" in summed:
        ib, nvlink = summed.pop("a2a_bytes").tolist()
        metrics.update({"comm/a2a_bytes/ib": int(ib), "comm/a2a_bytes/nvlink": int(nvlink)})
    if "idle" in summed:  # the measured idle share of the step, mean over all ranks
        metrics["pipeline/bubble_ratio"] = float(summed.pop("idle")) / world_size
    return metrics

"""`moetron-plan`: which layout to run a model in on a cluster, and what it costs.

    moetron-plan                                        # DeepSeek-V3 on 2048 H800s: the best layouts
    moetron-plan parallel.pp=16 parallel.ep=64 parallel.schedule=dualpipe train.micro_batch=1
    moetron-plan model=mini cluster=h200_8 train.seq_len=2048 train.global_batch=64 --json
    moetron-plan --calibrate fp8_linear.json --calibrate outputs/run/metrics.jsonl
    moetron-plan parallel.pp=16 parallel.ep=64 --launch-script    # sbatch / srun / torchrun lines
    moetron-plan parallel.pp=16 parallel.ep=64 --plot plan.png     # the table as a chart
    moetron-plan model=v3_671b train.seq_len=4096 --memory         # activations kept per layer, measured

Arguments are Hydra overrides of conf/plan.yaml (the same groups as moetron-train). Overrides of
parallel.pp / parallel.ep / parallel.dp / parallel.schedule / train.micro_batch / precision /
plan.recompute fix those parts of the layout; the rest is searched.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Optional

import torch
from hydra.errors import HydraException
from omegaconf import open_dict
from omegaconf.errors import OmegaConfBaseException

from moetron.pipeline.builders import BUILDERS
from moetron.plan.calibrate import calibrate
from moetron.plan.estimate import Estimate, Problem, estimate, memory_parts
from moetron.plan.hardware import Efficiency, Hardware
from moetron.plan.launch import launch_lines, planned_run
from moetron.plan.memory import MemorySettings, bytes_by_kind, measure, memory_table, with_activations
from moetron.plan.search import Fixed, context_sizes, layouts
from moetron.precision.dtypes import param_dtype


def _compose(overrides: list[str]):
    """The composed config (without its `hydra` node) and the model preset it chose."""
    from hydra import compose, initialize_config_module

    from moetron.plan.settings import register_plan_configs
    register_plan_configs()
    with initialize_config_module(config_module="moetron.conf", version_base="1.3"):
        cfg = compose(config_name="plan", overrides=overrides, return_hydra_config=True)
    model_choice = cfg.hydra.runtime.choices.model
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, model_choice


def fixed_from(overrides: list[str], cfg) -> Fixed:
    """What the overrides fix; a precision group or key fixes FP8 on or off."""
    fixed = Fixed()
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key in ("parallel.pp", "parallel.ep", "parallel.dp", "parallel.cp"):
            setattr(fixed, key.split(".")[1], int(value))
        elif key == "parallel.schedule":
            if value not in BUILDERS:
                raise ValueError(f"parallel.schedule={value!r}: choose one of {sorted(BUILDERS)}")
            fixed.schedule = value
        elif key == "train.micro_batch":
            fixed.micro_batch = int(value)
        elif key == "precision" or key == "precision.fp8":
            fixed.fp8 = bool(cfg.precision.fp8)
    if cfg.plan.recompute is not None:
        fixed.recompute = bool(cfg.plan.recompute)
    return fixed


ACTIVATED = "output head counted, input embedding table not: a token reads one row of it"


def _table(rows: list[Estimate], hw: Hardware) -> str:
    head = (f"{'layout':44s} {'step s':>7s} {'tok/s':>10s} {'MFU':>6s} {'GiB/GPU':>8s} {'exp.comm s':>10s} "
            f"{'bubble':>7s} {'GPU-h/T':>9s} {'days':>7s} {'cost':>10s}")
    lines = [head, "-" * len(head)]
    for e in rows:
        flag = "" if e.fits else f"  (needs {e.memory_per_gpu_gib:.0f} > {hw.memory_gib:.0f} GiB)"
        lines.append(f"{e.layout.describe():44s} {e.step_time_s:7.2f} {e.tokens_per_s:10.0f} {e.mfu:6.1%} "
                     f"{e.memory_per_gpu_gib:8.1f} {e.exposed_comm_s:10.2f} {e.bubble_ratio:7.1%} "
                     f"{e.gpu_hours_per_trillion_tokens:9.0f} {e.days:7.1f} {e.cost:10.3g}{flag}")
    return "\n".join(lines)


def _tokens(n: float) -> str:
    """14.8e12 -> '14.8T'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:.4g}"


def memory_warning(best: Estimate, hw: Hardware) -> str:
    """What --launch-script says above the lines of a layout that does not fit."""
    return (f"WARNING: this layout does not fit in memory: {best.memory_per_gpu_gib:.1f} GiB per GPU predicted "
            f"against {hw.memory_gib:g} GiB on {hw.name} (cluster.memory_gib), and no layout these overrides "
            "allow fits")


def measured_costs(spec, model_cfg, seq: int, recompute: bool, fp8: bool, fp8_cache: bool,
                   memory: tuple[str, ...] = (), param_dtype: str = "bfloat16") -> list:
    """The spec's layer costs with the activations each layer keeps, measured (moetron.plan.memory)
    under the report's recompute policy (every switch the model has) or none, the memory switches
    `memory` (moetron.parallel.memory) and working weights in `param_dtype`."""
    key = (type(spec).__name__, repr(model_cfg), seq, recompute, fp8, fp8_cache, tuple(memory), param_dtype)
    if key not in _MEASURED:  # a measurement of a long sequence takes seconds: once per process
        switches = spec.recompute_switches(model_cfg) if recompute else ()
        common = dict(fp8=fp8, fp8_cache=fp8_cache, memory=memory, param_dtype=param_dtype)
        kept = measure(spec, model_cfg, MemorySettings(seq, recompute=switches, **common))
        written = kept if not switches else measure(spec, model_cfg, MemorySettings(seq, **common))
        _MEASURED[key] = with_activations(spec.layer_costs(model_cfg, seq, recompute), kept, written)
    return copy.deepcopy(_MEASURED[key])


_MEASURED: dict = {}  # measured_costs's, by their arguments


def planned_param_dtype(cfg) -> str:
    """The working weights' dtype on the cluster's GPUs (precision.param_dtype; auto: bfloat16 there)."""
    return str(param_dtype(cfg.precision, torch.device("cuda"))).removeprefix("torch.")


def memory_switches(cfg) -> tuple[str, ...]:
    """The `memory.<switch>` keys on in a composed config."""
    return tuple(k for k, v in cfg.memory.items() if v)


def plan(cfg, fixed: Fixed, eff: Efficiency) -> tuple[list[Estimate], dict]:
    """Estimates of the layouts that fit, best first (or, when none fits, the smallest memory
    first), and what the model is."""
    from moetron.train.validate import model_config
    spec, model_cfg = model_config(cfg)
    hw = Hardware.from_config(cfg.cluster)
    seq = int(cfg.train.seq_len)
    total, active = spec.parameter_counts(model_cfg)
    problems: dict = {}

    def problem(recompute: bool, fp8: bool) -> Problem:
        key = (recompute, fp8)
        if key not in problems:
            weights = planned_param_dtype(cfg)
            costs = measured_costs(spec, model_cfg, seq, recompute, fp8, fp8 and bool(cfg.precision.fp8_cache_activations),
                                   memory_switches(cfg), weights)
            groups = spec.routing_groups(model_cfg)
            problems[key] = Problem(costs, hw, eff, seq, model_cfg.hidden_size, groups,
                                    spec.flops_per_token(model_cfg, seq), float(cfg.plan.tokens),
                                    2.0 if cfg.optim.moments_dtype == "bfloat16" else 4.0,
                                    2.0 if weights == "bfloat16" else 4.0, bool(cfg.precision.fp8_dispatch))
        return problems[key]

    decoders = sum(1 for c in problem(False, False).costs if c.kind in ("dense", "moe"))
    fits, misfits = [], []
    # context parallelism is for sequences no layout without it holds: tried when none fits (or fixed)
    for cps in [(fixed.cp,)] if fixed.cp else [(1,), tuple(context_sizes(hw.gpus, seq))]:
        for layout in layouts(hw.gpus, decoders, spec.routed_experts(model_cfg) or 1, int(cfg.train.global_batch),
                              fixed, tuple(cfg.plan.micro_batches), cps):
            if spec.ep_nodes_problem(model_cfg, max(layout.expert_ranks // hw.gpus_per_node, 1)):
                continue  # the trainer would refuse its EP groups (node-limited routing)
            p = problem(layout.recompute, layout.fp8)
            memory = sum(memory_parts(p, layout).values())
            (fits if memory <= hw.memory_gib else misfits).append((memory, layout, p))
        if fits:
            break
    if fits:
        rows = sorted((estimate(p, lay) for _, lay, p in fits), key=lambda e: e.gpu_hours_per_trillion_tokens)
    else:
        rows = [estimate(p, lay) for _, lay, p in sorted(misfits, key=lambda m: m[0])[:max(int(cfg.plan.top), 1)]]
    chosen = problem(rows[0].layout.recompute, rows[0].layout.fp8).costs if rows else []
    return rows, {"params_total": total, "params_active": active, "flops_per_token": spec.flops_per_token(model_cfg, seq),
                  "cluster": hw.name, "gpus": hw.gpus, "seq_len": seq, "global_batch": int(cfg.train.global_batch),
                  "tokens": float(cfg.plan.tokens),  # the run that days and cost are for
                  "activation_bytes_per_token": bytes_by_kind(chosen),  # the best layout's, at pp=1
                  "weight_copy_bytes_per_microbatch": {"dense": sum(c.weight_copy_bytes for c in chosen),
                                                       "routed": sum(c.routed_copy_bytes for c in chosen)},
                  "weight_copy_bytes_per_step": {"dense": sum(c.shared_copy_bytes for c in chosen),
                                                 "routed": sum(c.shared_routed_copy_bytes for c in chosen)}}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="moetron-plan", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/plan.yaml")
    parser.add_argument("--json", action="store_true", help="one JSON object: the best layout and the candidates")
    parser.add_argument("--calibrate", action="append", default=[], metavar="RESULTS",
                        help="set efficiency factors from this project's measurements: benchmarks/gpu/fp8_linear.py "
                             "--json output, or a run's metrics.jsonl (MaxVio)")
    parser.add_argument("--plot", metavar="FILE.png", help="the table as a chart: each layout's step time split "
                                                            "into compute, exposed communication and bubble")
    parser.add_argument("--launch-script", action="store_true",
                        help="print the sbatch / srun / torchrun lines and rank placement of the best layout")
    parser.add_argument("--memory", action="store_true",
                        help="the activations each kind of layer keeps for the backward, per token, under each "
                             "recompute / FP8 setting (measured on fake tensors: moetron.plan.memory)")
    args = parser.parse_args(argv)
    try:
        cfg, model_choice = _compose(args.overrides)
        if args.memory:
            from moetron.train.validate import model_config

            spec, model_cfg = model_config(cfg)
            print(memory_table(spec, model_cfg, int(cfg.train.seq_len), memory_switches(cfg), planned_param_dtype(cfg)))
            return 0
        fixed = fixed_from(args.overrides, cfg)
        hw = Hardware.from_config(cfg.cluster)
        calibrated = calibrate(args.calibrate, hw) if args.calibrate else {}
        eff = Efficiency.from_config(cfg.plan, calibrated)
        if hw.sms <= eff.comm_sms:
            raise ValueError(f"cluster.sms={hw.sms} leaves no SMs for compute beside plan.comm_sms={eff.comm_sms}: "
                             "set cluster.sms to the GPU's SM count (132 on H100/H200/H800)")
        rows, model = plan(cfg, fixed, eff)
    except (ValueError, FileNotFoundError, NotImplementedError, HydraException, OmegaConfBaseException) as err:
        print(f"moetron-plan: error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("moetron-plan: error: no layout divides the cluster and train.global_batch with these overrides; "
              "free a fixed key or change train.global_batch", file=sys.stderr)
        return 2
    best = rows[0]
    if args.plot:
        from moetron.plan.chart import draw_plan
        draw_plan(rows[:int(cfg.plan.top)], args.plot, f"{model['params_total'] / 1e9:.0f}B-parameter model on "
                  f"{hw.name} ({hw.gpus} GPUs): step time per layout")
    if args.json:
        out = {**model, "layout": best.as_dict()["layout"], **{k: v for k, v in best.as_dict().items() if k != "layout"},
               "tokens_per_s_per_gpu": best.tokens_per_s / model["gpus"], "efficiency": vars(eff), "calibrated": calibrated,
               "candidates": [e.as_dict() for e in rows[:int(cfg.plan.top)]]}
        print(json.dumps(out, indent=1))
    elif args.launch_script:
        from moetron.train.validate import model_config

        spec, model_cfg = model_config(cfg)
        lines = launch_lines(best.layout, hw, args.overrides, planned_run(cfg, model_choice), best.stage_layout,
                             spec.recompute_switches(model_cfg))
        if not best.fits:
            warning = memory_warning(best, hw)
            print(f"moetron-plan: {warning}", file=sys.stderr)
            lines = f"# {warning}\n{lines}"
        print(lines)
    else:
        print(f"{model['params_total'] / 1e9:.1f}B parameters, {model['params_active'] / 1e9:.2f}B activated per token "
              f"({ACTIVATED}); {model['flops_per_token'] / 1e9:.1f} GFLOP per token; {hw.name}: {hw.gpus} GPUs")
        print(f"GPU-h/T: GPU-hours per trillion tokens; days and cost: for plan.tokens={_tokens(model['tokens'])} "
              f"tokens at cluster.price_per_gpu_hour={hw.price_per_gpu_hour:g} (plan.tokens=... changes it)")
        if calibrated:
            print(f"calibrated: {calibrated}")
        if not best.fits:
            print("no layout fits in memory; the smallest:")
        print(_table(rows[:int(cfg.plan.top)], hw))
    return 0


if __name__ == "__main__":
    sys.exit(main())

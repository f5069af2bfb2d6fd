"""The exact lines that launch a planned layout under SLURM, and where its ranks sit, without
starting anything (`moetron-plan ... --launch-script`).

Ranks follow moetron.parallel.dims: the grid arange(world).view(pp, dp, ep, cp), ranks filling
nodes in order; so an EP group (ep x cp ranks: the experts fold over context parallelism) is a run
of consecutive ranks and spans ep x cp / gpus_per_node nodes, and a pipeline stage's dp x ep x cp
ranks sit on consecutive nodes.
"""
from __future__ import annotations

import json
import shlex
from typing import Optional

from omegaconf import OmegaConf

from moetron.plan.estimate import Layout
from moetron.plan.hardware import Hardware

LAYOUT_KEYS = ("parallel.pp=", "parallel.ep=", "parallel.dp=", "parallel.cp=", "parallel.zero1=",
               "parallel.schedule=", "train.micro_batch=", "precision=", "plan.")
PLANNED_KEYS = ("train.seq_len", "train.global_batch", "optim.moments_dtype", "precision.compute_dtype",
                "precision.fp8_cache_activations")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def planned_run(cfg, model_choice: str) -> list[str]:
    """The settings of the planned run that moetron-train's defaults differ on (conf/plan.yaml sets
    them, or the user did), as overrides, from the composed config."""
    out = [f"model={model_choice}"]
    for key in PLANNED_KEYS:
        value = OmegaConf.select(cfg, key)
        out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def train_overrides(layout: Layout, hw: Hardware, overrides: list[str], planned: list[str],
                    stage_layout: Optional[list[list[int]]] = None,
                    recompute_switches: tuple[str, ...] = ("norm", "mla_up_proj", "swiglu")) -> list[str]:
    """moetron-train's overrides for `layout`: the planned run's settings (`planned_run`), the
    user's other overrides (not the planner's), and the layout's (under recompute, the switches the
    model has a slot for: the spec's `recompute_switches`)."""
    planned_keys = {_key(p) for p in planned}
    kept = [o for o in overrides if not o.lstrip("+~").startswith(LAYOUT_KEYS) and _key(o) not in planned_keys]
    out = [*planned, *kept, f"cluster={hw.name}" if not any(o.startswith("cluster=") for o in kept) else None,
           f"parallel.pp={layout.pp}", f"parallel.ep={layout.ep}", f"parallel.dp={layout.dp}",
           f"train.micro_batch={layout.micro_batch}", f"precision={'fp8' if layout.fp8 else 'bf16'}",
           f"parallel.zero1={str(layout.zero1).lower()}"]  # as planned (the trainer's default: on when dp > 1)
    if layout.cp > 1:
        out.append(f"parallel.cp={layout.cp}")
    if layout.pp > 1:
        out.append(f"parallel.schedule={layout.schedule}")
        if stage_layout:  # the planner's balanced split (the head and MTP ride with the last stage)
            out.append("parallel.layout=" + json.dumps(stage_layout, separators=(",", ":")))
    if layout.recompute:
        out += [f"recompute.{switch}=true" for switch in recompute_switches]
    return [o for o in out if o]


def placement(layout: Layout, hw: Hardware) -> list[str]:
    """One line per node: its ranks, their pipeline stage, dp index and EP ranks; then which nodes
    each EP group spans."""
    g, lines = hw.gpus_per_node, []
    size = layout.ep * layout.cp  # an EP group's ranks
    for node in range(hw.nodes):
        ranks = range(node * g, (node + 1) * g)
        coords = [(r // (layout.dp * size), r // size % layout.dp, r % size) for r in ranks]
        pps, dps = sorted({c[0] for c in coords}), sorted({c[1] for c in coords})
        eps = [c[2] for c in coords]
        lines.append(f"node {node:4d}: ranks {ranks[0]:5d}-{ranks[-1]:5d} | pp stage {','.join(map(str, pps))} | "
                     f"dp {','.join(map(str, dps))} | ep ranks {min(eps)}-{max(eps)}")
    span = max(size // g, 1)
    groups = layout.pp * layout.dp
    lines.append(f"{groups} EP groups of {size} ranks, each on {span} node(s): EP group i = ranks "
                 f"{size}*i .. {size}*i+{size - 1}, nodes {span}*i .. {span}*i+{span - 1}"
                 if size >= g else
                 f"{groups} EP groups of {size} ranks, {g // size} per node (NVLink only)")
    if layout.cp > 1:
        lines.append(f"cp groups of {layout.cp} consecutive ranks: each sequence split over one")
    return lines


def launch_lines(layout: Layout, hw: Hardware, overrides: list[str], planned: list[str],
                 stage_layout: Optional[list[list[int]]] = None,
                 recompute_switches: tuple[str, ...] = ("norm", "mla_up_proj", "swiglu")) -> str:
    args = " ".join(shlex.quote(o) for o in train_overrides(layout, hw, overrides, planned, stage_layout,
                                                            recompute_switches))
    g = hw.gpus_per_node
    return "\n".join([
        f"# {layout.describe()} on {hw.nodes} nodes x {g} GPUs ({hw.name})",
        "# submit (one task per GPU; launch/slurm/train.sbatch sets the rendezvous, requeue and signals):",
        f"sbatch --nodes={hw.nodes} --gpus-per-node={g} --ntasks-per-node={g} launch/slurm/train.sbatch {args}",
        "# or one task per node running torchrun:",
        f"MOETRON_LAUNCH=torchrun sbatch --nodes={hw.nodes} --gpus-per-node={g} launch/slurm/train.sbatch {args}",
        "# what the job runs, in srun mode and in torchrun mode:",
        f"srun --kill-on-bad-exit=1 python -m moetron.train {args}",
        f"srun --ntasks-per-node=1 torchrun --nnodes={hw.nodes} --nproc-per-node={g} --rdzv-backend=c10d "
        f"--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$SLURM_JOB_ID -m moetron.train {args}",
        "# rank placement:",
        *placement(layout, hw),
    ])

"""A pipeline step as a Gantt chart: one row per rank, a box per compute action.

Forward, input backward (B), weight backward (W), a whole backward (BW) and an overlapped F&B pair
each have a colour; the box says its micro-batch (a pair: forward / backward). Micro-batches of
DualPipe's second direction (their chain enters at the last rank) are hatched. White is idle time.
Simulated schedules (`python -m moetron.pipeline.simulate ... --plot`) and measured steps
(`logging.timeline=true`, drawn by `moetron-report`) go through the same function.

    spans: per rank, [(Action, start, end), ...]

A measured step is saved per rank as JSON (`save_rank_timeline`): the schedule's name, ranks and
micro-batch count, and each action with its start and end in seconds from the rank's step start
(each rank's own clock: ranks start a step together, after the previous step's last collective).
"""
from __future__ import annotations

import json
from pathlib import Path

from moetron.pipeline.schedule import Action

COLOURS = {"F": "#4C72B0", "B": "#55A868", "W": "#DD8452", "BW": "#2A9D8F", "FB": "#8172B3"}
NAMES = {"F": "forward", "B": "backward (inputs)", "W": "backward (weights)", "BW": "backward", "FB": "F&B pair"}


def box_label(action) -> str:
    kind = action.kind.value
    return f"{action.mb}/{action.mb2}" if kind == "FB" else str(action.mb)


def draw_timeline(spans: list, sched, path, title: str, time_unit: str = "") -> tuple[Path, int]:
    """Write the chart to `path` (PNG, headless); returns the path and how many boxes it drew.
    `sched` tells the directions apart (its chain per micro-batch); `time_unit` labels the x axis
    ("s" for measured steps)."""
    from matplotlib.patches import Patch

    from moetron.plotting import save_figure, use_agg

    plt = use_agg()

    ranks = len(spans)
    t0 = min((start for row in spans for _, start, _ in row), default=0.0)
    end = max((stop for row in spans for _, _, stop in row), default=1.0) - t0
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, 0.35 * sum(len(r) for r in spans) / max(ranks, 1) + 4)),
                                    0.55 * ranks + 1.6))
    two_way, boxes = len(sched.chains) > 1, 0
    for rank, row in enumerate(spans):
        y = ranks - 1 - rank
        for action, start, stop in row:
            kind = action.kind.value
            second = two_way and sched.chain_of_mb[action.mb if kind != "FB" else action.mb2] == 1
            ax.barh(y, stop - start, left=start - t0, height=0.8, color=COLOURS.get(kind, "grey"),
                    edgecolor="black", linewidth=0.4, hatch="///" if second else None)
            boxes += 1
            if (stop - start) > end / 80:
                ax.text(start - t0 + (stop - start) / 2, y, box_label(action), ha="center", va="center",
                        fontsize=6, color="white")
    ax.set_yticks(range(ranks), [f"rank {r}" for r in reversed(range(ranks))])
    ax.set_xlim(0, end)
    ax.set_xlabel(f"time ({time_unit})" if time_unit else "time (cost units)")
    ax.set_title(title, fontsize=9)
    kinds = sorted({a.kind.value for row in spans for a, _, _ in row}, key=list(COLOURS).index)
    handles = [Patch(color=COLOURS[k], label=NAMES[k]) for k in kinds]
    if two_way:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="second direction"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=len(handles), fontsize=7,
              frameon=False)
    return save_figure(fig, path, dpi=110), boxes


def save_rank_timeline(path, spans: list, step_started: float, sched, step: int, rank: int) -> Path:
    """One rank's measured step (`spans` from PipelineRunner.action_spans) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [[a.kind.value, a.mb, a.stage, a.mb2, a.stage2, start - step_started, end - step_started]
            for a, start, end in spans]
    path.write_text(json.dumps({"step": step, "rank": rank, "schedule": sched.name, "pp": sched.num_ranks,
                                "microbatches": sched.num_microbatches, "spans": rows}))
    return path


def load_timelines(folder) -> tuple[dict, list]:
    """(the header of pipeline rank 0's file, spans per pipeline rank) from the files
    `save_rank_timeline` wrote for one step (one pipeline's ranks: `rank` is the pipeline rank)."""
    files = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("rank*.json"))]
    if not files:
        raise FileNotFoundError(f"no rank*.json timelines in {folder}")
    head = next((f for f in files if f["rank"] == 0), files[0])
    spans = [[] for _ in range(head["pp"])]
    for data in files:
        if (data["step"], data["pp"], data["schedule"]) != (head["step"], head["pp"], head["schedule"]):
            continue  # left by an earlier run of another layout in this run directory
        spans[data["rank"]] = [(Action(k, mb, st, mb2, st2), start, end)
                                            for k, mb, st, mb2, st2, start, end in data["spans"]]
    return head, spans

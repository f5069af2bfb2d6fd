"""`moetron-report RUN_DIR`: PNGs of a run and one HTML page that shows them.

    moetron-report outputs/tiny                       # writes outputs/tiny/report/index.html
    moetron-report outputs/tiny --steps 10 200 --out /tmp/report

From metrics.jsonl: losses (total, LM, MTP, balance, validation), throughput and MFU, MaxVio per
layer, tokens per expert as layers x experts heatmaps at chosen steps (default: the first, middle
and last logged) and over the run, the routing bias per expert, and the pipeline bubble. From
timeline/ (a pipelined run with logging.timeline=true): the measured step as a Gantt chart, next to
the same schedule simulated with the measured mean cost of each action kind.
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import Optional

from moetron.report import figures
from moetron.report.records import jsonl_records


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records; a last line cut short (a killed run) is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the run directory of a moetron-train run")
    records = jsonl_records(path.read_text(), str(path))
    if not records:
        raise ValueError(f"{path} holds no steps yet")
    return records


def timelines(run_dir: Path, out: Path) -> list[tuple[str, Path]]:
    """The measured step and the same schedule simulated with its mean action costs."""
    from moetron.pipeline.builders import build_schedule
    from moetron.pipeline.simulate import Costs, simulate
    from moetron.pipeline.timeline import draw_timeline, load_timelines

    head, spans = load_timelines(run_dir / "timeline")
    sched = build_schedule(head["schedule"], head["pp"], head["microbatches"])
    measured, _ = draw_timeline(spans, sched, out / "timeline_measured.png",
                                f"{head['schedule']}, pp={head['pp']}, {head['microbatches']} micro-batches: "
                                f"step {head['step']} as measured", time_unit="s")
    durations: dict[str, list[float]] = {}
    for row in spans:
        for action, start, end in row:
            durations.setdefault(action.kind.value, []).append(end - start)
    mean = {k: sum(v) / len(v) for k, v in durations.items()}
    f, b = mean.get("F", 1.0), mean.get("B", mean.get("BW", 2.0) / 2)
    w = mean.get("W", mean.get("BW", 2.0) - b)
    result = simulate(sched, Costs(f, b, w, mean.get("FB")))
    simulated, _ = draw_timeline(result.spans, sched, out / "timeline_simulated.png",
                                 f"the same schedule simulated with the measured mean costs: bubble "
                                 f"{result.bubble_ratio:.1%}", time_unit="s")
    return [("pipeline step, measured", measured), ("pipeline step, simulated", simulated)]


def build_report(run_dir: Path, out: Optional[Path] = None, steps: Optional[list[int]] = None) -> Path:
    """Write the PNGs and index.html into `out` (default RUN_DIR/report); returns index.html."""
    records = read_records(run_dir)
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    shown: list[tuple[str, Path]] = []
    figures.losses(records, out / "losses.png")
    shown.append(("losses", out / "losses.png"))
    if any("rl/reward_mean" in r for r in records):
        figures.rewards(records, out / "rewards.png")
        shown.append(("GRPO rewards and policy", out / "rewards.png"))
    figures.throughput(records, out / "throughput.png")
    shown.append(("throughput and MFU", out / "throughput.png"))
    if figures.layer_keys(records, "moe/load/"):
        figures.maxvio(records, out / "maxvio.png")
        shown.append(("MaxVio per MoE layer", out / "maxvio.png"))
        logged = [r["step"] for r in records if any(k.startswith("moe/load/") for k in r)]
        for step in steps or sorted({logged[0], logged[len(logged) // 2], logged[-1]}):
            layers, matrix = figures.load_matrix(records, step)
            path = figures.heatmap(layers, matrix, out / f"experts_step{step}.png", f"tokens per expert, step {step}")
            shown.append((f"tokens per expert at step {step}", path))
        layers, matrix = figures.load_matrix(records)
        shown.append(("tokens per expert over the run",
                      figures.heatmap(layers, matrix, out / "experts_run.png", "tokens per expert, whole run")))
        if figures.layer_keys(records, "moe/rollout_load/"):  # GRPO: the same, while sampling
            layers, matrix = figures.load_matrix(records, prefix="moe/rollout_load/")
            shown.append(("tokens per expert while sampling (GRPO rollouts), over the run",
                          figures.heatmap(layers, matrix, out / "experts_rollouts.png",
                                          "tokens per expert while sampling, whole run")))
    if figures.layer_keys(records, "moe/bias/"):
        figures.bias(records, out / "bias.png")
        shown.append(("routing bias per expert", out / "bias.png"))
    if any("pipeline/bubble_ratio" in r for r in records):
        figures.bubble(records, out / "bubble.png")
        shown.append(("pipeline bubble", out / "bubble.png"))
    if (run_dir / "timeline").is_dir():
        shown += timelines(run_dir, out)
    page = "\n".join(f"<h2>{html.escape(title)}</h2>\n<img src=\"{html.escape(path.name)}\" alt=\"{html.escape(title)}\">"
                     for title, path in shown)
    index = out / "index.html"
    index.write_text(f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>moetron report: "
                     f"{html.escape(run_dir.name)}</title></head>\n<body>\n<h1>{html.escape(str(run_dir))}: steps "
                     f"{records[0]['step']}-{records[-1]['step']}</h1>\n{page}\n</body></html>\n")
    return index


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="moetron-report", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs and index.html go (RUN_DIR/report)")
    parser.add_argument("--steps", type=int, nargs="*", default=None, help="steps of the expert heatmaps")
    args = parser.parse_args(argv)
    try:
        index = build_report(args.run_dir, args.out, args.steps)
    except (FileNotFoundError, ValueError) as err:
        print(f"moetron-report: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The planner's table as a chart (`moetron-plan ... --plot FILE.png`): each candidate layout's step
time split into compute, exposed communication, the overlapped pairs' slowdown and bubble."""
from __future__ import annotations

from pathlib import Path

PARTS = (("compute", "#4C72B0"), ("exposed communication", "#C44E52"), ("SMs taken by communication", "#DD8452"),
         ("bubble and waits", "#BBBBBB"))


def step_parts(e) -> list[float]:
    """[compute, exposed communication, SM slowdown, bubble] seconds; they add up to the step."""
    rest = max(0.0, e.step_time_s - e.compute_s - e.exposed_comm_s - e.sm_slowdown_s)
    return [e.compute_s, e.exposed_comm_s, e.sm_slowdown_s, rest]


def draw_plan(rows: list, path, title: str) -> tuple[Path, list[list[float]]]:
    """Stacked bars, one per layout (best at the top); returns the path and the parts drawn."""
    from moetron.plotting import save_figure, use_agg

    plt = use_agg()

    parts = [step_parts(e) for e in rows]
    fig, ax = plt.subplots(figsize=(12, 1.4 + 0.4 * len(rows)))
    labels = [e.layout.describe() + ("" if e.fits else " (does not fit)") for e in rows]
    y = list(range(len(rows)))[::-1]
    left = [0.0] * len(rows)
    for i, (name, colour) in enumerate(PARTS):
        widths = [p[i] for p in parts]
        ax.barh(y, widths, left=left, color=colour, label=name)
        left = [a + b for a, b in zip(left, widths)]
    for yi, e, total in zip(y, rows, left):
        ax.text(total, yi, f"  {e.gpu_hours_per_trillion_tokens:,.0f} GPU-h/T", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set(xlabel="step time (s)", title=title)
    ax.set_xlim(0, max(left, default=1.0) * 1.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path), parts

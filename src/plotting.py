"""Headless matplotlib for every picture moetron draws (timelines, the run report, the planner's
chart): the Agg backend, since a cluster node has no display."""
from __future__ import annotations

from pathlib import Path


def use_agg():
    """pyplot on the headless Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    return plt


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Lay out, write as PNG (folders made), close; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    use_agg().close(fig)
    return path

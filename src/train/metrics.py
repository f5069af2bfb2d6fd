"""Where a step's metrics go: metrics.jsonl (always), Weights & Biases (offline unless credentials
are set, or as `logging.wandb.mode` says), and a console progress bar; all from one rank.

Metric names (DESIGN.md): loss, loss/lm, loss/mtp, loss/seq_aux | loss/aux, lr, grad_norm,
throughput/tokens_per_s, throughput/tflops, throughput/mfu, moe/maxvio_batch (+ /layer_{i}),
moe/load/layer_{i} (tokens per expert; a histogram on W&B), moe/bias_abs_mean/layer_{i},
memory/peak_gib, memory/activations_gib (the peak of what the step's forwards kept for their backward,
on the logging rank: moetron.core.saved_tensors), step_time_s.
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import torch


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class JsonlWriter:
    """metrics.jsonl, one JSON object per step; on resume, entries after the resumed step (written
    after the last checkpoint by an interrupted run) are dropped so each step appears once."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = path.open("a")

    def log(self, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def wandb_mode(requested: str) -> str:
    """`auto`: WANDB_MODE if set, else online with credentials (WANDB_API_KEY or `wandb login`), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("disabled", "offline", "online"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class WandbLogger:
    """Metrics to W&B (when logging.wandb.mode is not disabled): tokens per expert as histograms, and
    every `heatmap_every` steps the layers x experts heatmap as an image."""

    def __init__(self, cfg, run_dir: Path, config_dict: dict, resume_step: int, heatmap_every: int = 0) -> None:
        self.run, self.heatmap_every, self.run_dir = None, heatmap_every, run_dir
        mode = wandb_mode(cfg.mode)
        if mode == "disabled":
            return
        import wandb

        self.wandb = wandb
        run_id_file = run_dir / "wandb_run_id"
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else uuid.uuid4().hex[:12]
        run_id_file.write_text(run_id)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, dir=str(run_dir), mode=mode,
                              config=config_dict, id=run_id, resume="allow" if resume_step else None)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        logged = {}
        for key, value in metrics.items():
            if key.startswith(("moe/load/", "moe/rollout_load/")):  # tokens per expert: a histogram over expert ids
                import numpy as np

                logged[key] = self.wandb.Histogram(np_histogram=(np.asarray(value), np.arange(len(value) + 1)))
            elif not key.startswith("moe/bias/"):  # per-expert biases: in metrics.jsonl and the report
                logged[key] = value
        if self.heatmap_every and step % self.heatmap_every == 0 and any(k.startswith("moe/load/") for k in metrics):
            from moetron.report.figures import heatmap, load_matrix

            layers, matrix = load_matrix([metrics], step)
            path = heatmap(layers, matrix, self.run_dir / "report" / "wandb_heatmap.png", f"tokens per expert, step {step}")
            logged["moe/heatmap"] = self.wandb.Image(str(path))
        self.run.log(logged, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class Console:
    """Progress on the console: a tqdm bar (loss, tokens/s, MFU, MaxVio) when it is a terminal and
    `logging.progress` is on; otherwise (SLURM output files, `logging.progress=false`) a plain line
    every `train.log_every` steps that a batch job's log can be read by. A summary line at the end."""

    def __init__(self, enabled: bool, start: int, total: int, log_every: int = 1, stream=None) -> None:
        self.bar, self.start, self.total, self.log_every = None, start, total, max(1, log_every)
        self.started = time.perf_counter()
        stream = stream if stream is not None else sys.stderr
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=stream)

    def update(self, metrics: dict[str, Any]) -> None:
        maxvio = metrics.get("moe/maxvio_batch")
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['throughput/tokens_per_s']:.0f}",
                                  "mfu": f"{metrics['throughput/mfu']:.2%}", "maxvio": f"{maxvio or 0.0:.3f}"},
                                 refresh=False)
            self.bar.update(1)
            return
        step = int(metrics["step"])
        if step % self.log_every and step != self.total:
            return
        per_step = (time.perf_counter() - self.started) / max(step - self.start, 1)
        eta = datetime.timedelta(seconds=round(per_step * (self.total - step)))
        line = (f"step {step}/{self.total} | loss {metrics['loss']:.4f} | {metrics['throughput/tokens_per_s']:,.0f} tok/s"
                f" | MFU {metrics['throughput/mfu']:.2%}" + (f" | MaxVio {maxvio:.3f}" if maxvio is not None else "")
                + f" | ETA {eta}")
        print(line, flush=True)

    def note(self, line: str) -> None:
        """A line above the bar (or on its own without one)."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self, summary: Optional[str]) -> None:
        if self.bar is not None:
            self.bar.close()
        if summary:
            print(summary, flush=True)

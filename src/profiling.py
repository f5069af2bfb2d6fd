"""Profiler traces: labels for the phases of a step, and a trace of chosen steps (`logging.profile`).

`label(name)` marks a region in torch.profiler traces and costs a flag check while no profiler
runs (entering `record_function` costs microseconds even then); any layer may use it.

`StepProfiler` is the trainer's `logging.profile`:

    moetron-train logging.profile.enabled=true logging.profile.start_step=5 logging.profile.num_steps=2

writes `<run dir>/profile/rank<R>-steps<a>-<b>.json` (`-step<a>.json` for one) for each rank in
`logging.profile.ranks` (`[]`: every rank); open it in https://ui.perfetto.dev or chrome://tracing.
Steps are numbered as logged (1-based); the steps before `start_step` warm up. Every thread is
recorded: the backward half of a DualPipe F&B pair runs on a second thread. The pipeline runner
labels each action (`pipeline.F mb3 stage1`, `pipeline.FB.backward ...`) and the MoE layer its
dispatch, experts and combine, so a trace shows which exchange overlaps which computation (on a
GPU, kernels per stream). The trace is written to a temporary name and renamed, so a crash never
leaves half a file.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.autograd.profiler as autograd_profiler
from torch.profiler import ProfilerActivity, profile, record_function


def label(name: str):
    """A labelled region in profiler traces; a no-op context while no profiler runs."""
    # torch's own flag "for fast python checks"; where a torch lacks it, always label
    return record_function(name) if getattr(autograd_profiler, "_is_profiler_enabled", True) else nullcontext()


def all_threads_config():
    """The profiler setting that records every thread, not only the one that started it (newer torch)."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):  # older torch: the starting thread (and autograd's) only
        return None


class StepProfiler:
    """Profiles steps [start_step, start_step + num_steps) of this rank, if the config selects it."""

    def __init__(self, cfg, rank: int, run_dir: Path, device: torch.device) -> None:
        self.first = cfg.start_step
        self.last = cfg.start_step + cfg.num_steps - 1
        self.active = cfg.enabled and (not cfg.ranks or rank in cfg.ranks)
        self.steps = f"step {self.first}" if self.first == self.last else f"steps {self.first}-{self.last}"
        self.path = Path(run_dir) / "profile" / f"rank{rank}-{self.steps.replace(' ', '')}.json"
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._prof: Optional[profile] = None

    def begin(self, step: int) -> None:
        """Call before step `step` (1-based) runs."""
        if self.active and step == self.first:
            config = all_threads_config()
            self._prof = profile(activities=self.activities, **({"experimental_config": config} if config else {}))
            self._prof.start()

    def end(self, step: int) -> Optional[Path]:
        """Call after step `step` (1-based) ran; returns the trace's path once it is written."""
        if self._prof is None or step < self.last:
            return None
        prof, self._prof = self._prof, None
        prof.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, self.path)
        return self.path

    def close(self) -> None:
        """Stop a profile the run left early (an error, or train.exit_after_steps); nothing is written."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()

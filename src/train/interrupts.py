"""Stopping a run without losing it: signals that end it cleanly, and gradients that are not finite.

- SIGTERM, SIGUSR1 (what SLURM sends before a time limit with `--signal`) and a first SIGINT ask
  the run to stop: every rank finishes the current step, the ranks agree in the step's metrics
  reduction (no collective of its own), a checkpoint is written and the run exits with one message.
  Restarting the same command (a requeued job does) resumes from it. A second SIGINT, more than
  two seconds after the first, aborts at once.
- A rank that torchrun started and whose torchrun is gone (killed with -9, or by the OOM killer: its
  workers live in sessions of their own and would train on as orphans beside a restarted run) asks
  for the same stop at the next step boundary, naming the launcher.
- A gradient norm that is not finite (NaN or inf anywhere, on any rank: the norm is reduced over
  all of them, so every rank sees the same value without another collective) skips the step
  (`train.on_nonfinite=skip`: no optimizer step, no bias update, counted in `train/skipped_steps`)
  or stops the run naming the step and the first parameter whose gradient is not finite (`stop`).
  A checkpoint is never written from a non-finite state: a skipped step leaves the weights as they were.
- A collective that waits on a dead or hung peer longer than `train.collective_timeout_s` stops the
  run on the ranks still alive, each naming itself, the step and the phase it was in.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import torch
from torch import nn

from moetron.parallel.grad_buffer import accumulated_grad

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class TrainingStopped(Exception):
    """The run cannot go on (a non-finite gradient under train.on_nonfinite=stop); the message says why."""


_LAUNCHER = {"pid": None}


def remember_launcher() -> None:
    """Under torchrun, note the agent's pid (this worker's parent) at the process's start: a later
    parent means the agent died (StopRequests asks to stop then)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") and _LAUNCHER["pid"] is None:
        _LAUNCHER["pid"] = os.getppid()


class StopRequests:
    """While entered, the stop signals set `signal_name` instead of killing the process."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict = {}
        self._first_at = 0.0
        remember_launcher()  # (done at the start of moetron-train; here for runs started otherwise)
        self._launcher_pid = _LAUNCHER["pid"]

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        # a terminal's Ctrl-C reaches a rank twice under torchrun (from the terminal, then forwarded by
        # the agent): only a SIGINT a moment after the first is a second Ctrl-C, which aborts now
        if signum == signal.SIGINT and self.signal_name is not None and time.monotonic() - self._first_at > 2.0:
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, time.monotonic()

    def reason(self) -> Optional[str]:
        """Why this rank was asked to stop (a signal, its launcher's end), or None."""
        if self.signal_name is None and self._launcher_pid is not None and os.getppid() != self._launcher_pid:
            self.signal_name = f"the end of its launcher (torchrun, pid {self._launcher_pid})"
        return self.signal_name

    def flag(self, device: torch.device) -> torch.Tensor:
        """1 if this rank was asked to stop, for the step's metrics reduction (any rank stops all)."""
        self.reason()
        return torch.tensor(0.0 if self.signal_name is None else 1.0, dtype=torch.float64, device=device)


def is_timeout(err: BaseException) -> bool:
    """A collective gave up waiting on a peer (gloo and NCCL say so in their messages)."""
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


def first_nonfinite_gradient(model: nn.Module) -> Optional[str]:
    """The name of the first parameter (model order) whose gradient holds a NaN or inf on this rank.
    Called only once a step is known to be non-finite, so its host syncs cost nothing otherwise."""
    for name, p in model.named_parameters():
        grad = accumulated_grad(p)
        if grad is not None and not bool(torch.isfinite(grad).all()):
            return name
    return None

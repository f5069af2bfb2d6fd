"""An exponential moving average of the parameters, kept in CPU memory and updated asynchronously
after each optimizer step (DeepSeek-V3 report, section 3.3: it estimates the model after learning-
rate decay early, without another copy on the GPU).

`train.ema_decay=d` (0: off): ema = d x ema + (1 - d) x parameter, in float32. After each step the
parameters this rank holds are copied to host memory (on a GPU: into pinned buffers on the current
stream, so the next optimizer step cannot overtake the copy) and a worker thread blends them in
while training goes on. The average is saved in checkpoints as `ema/<name>` (the layout-independent
names of moetron.parallel.row_shards), and `train.eval_ema=true` evaluates on it. With BF16 working
weights it averages those (the float32 masters live sharded over the ZeRO-1 ranks): an update below
BF16's resolution moves the average only through the rounding of the weights it blends.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from moetron.parallel.materialize import expert_rows
from moetron.parallel.row_shards import EMA_PREFIX, REF_PREFIX, RowShard



class ParameterEMA:
    prefix = EMA_PREFIX  # its names in checkpoints
    description = "parameter average (train.ema_decay)"

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.params = {name: p for name, p in model.named_parameters() if not p.is_meta}
        on_gpu = any(p.is_cuda for p in self.params.values())
        self.shadow = {name: p.detach().float().cpu().clone() for name, p in self.params.items()}  # never the parameter itself
        # on GPUs: pinned host buffers the parameters are copied into after each step (they then hold
        # the parameters as they are, which evaluation on the average restores from)
        self._staging = {name: p.detach().cpu().pin_memory() for name, p in self.params.items()} if on_gpu else None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="ema")
        self._pending: Optional[Future] = None

    @torch.no_grad()
    def update(self) -> None:
        """Blend in the parameters as they are now (call after the optimizer step); returns at once."""
        self.wait()
        if self._staging is None:  # CPU: a copy now, the blend on the worker
            snapshot = {name: p.detach().float().clone() for name, p in self.params.items()}
            done = None
        else:
            for name, p in self.params.items():
                self._staging[name].copy_(p.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            snapshot = self._staging
        self._pending = self._worker.submit(self._blend, snapshot, done)

    @torch.no_grad()
    def _blend(self, snapshot: dict, done) -> None:
        if done is not None:
            done.synchronize()
        for name, value in snapshot.items():
            self.shadow[name].lerp_(value.float(), 1.0 - self.decay)

    def wait(self) -> None:
        """The last update blended in (before the average is read or saved)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    @torch.no_grad()
    def reset_to_parameters(self) -> None:
        self.wait()
        for name, p in self.params.items():
            self.shadow[name].copy_(p.detach().float().cpu())

    def state(self) -> dict:
        """`ema/<name>` per parameter this rank holds, whole or as its rows of an expert stack."""
        self.wait()
        rows = expert_rows(self.model)
        state = {}
        for name, value in self.shadow.items():
            first, total = rows.get(name, (0, value.shape[0] if value.ndim else 0))
            whole = not value.ndim or value.shape[0] == total
            state[self.prefix + name] = value if whole else RowShard(value, first, total)
        return state

    @contextmanager
    def swapped_in(self):
        """The model's parameters replaced by the average inside the block (evaluation), then back."""
        self.wait()
        saved = self._restore_point()
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])

    def _restore_point(self) -> dict:
        """The parameters to restore after a swap: the pinned copy of the last update on GPUs (no
        second copy on the device; a skipped step changed nothing since), a clone on CPUs."""
        return self._staging or {name: p.detach().clone() for name, p in self.params.items()}

    def close(self) -> None:
        self.wait()
        self._worker.shutdown()


class FrozenReference(ParameterEMA):
    """GRPO's reference model (rl.beta > 0): the weights the run started from, kept in host memory
    like the average (an average with decay 1, never updated), saved in checkpoints as `ref/<name>`
    and swapped in for the reference's forwards."""
    prefix = REF_PREFIX
    description = "GRPO reference model (rl.beta > 0)"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, decay=1.0)

    def update(self) -> None:
        raise RuntimeError("the GRPO reference model does not move")

    @torch.no_grad()
    def _restore_point(self) -> dict:
        """The parameters as they are now: never updated, the pinned buffers would still hold the
        starting weights (on a GPU, the policy came back as the reference after every swap)."""
        if self._staging is None:
            return super()._restore_point()
        for name, p in self.params.items():
            self._staging[name].copy_(p.detach())  # device to pinned host: returns once copied
        return self._staging

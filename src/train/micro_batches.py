"""Forward and backward of one optimizer step's micro-batches on this rank.

- `LocalMicroBatches` (pp = 1): the whole model runs each micro-batch, losses scaled by 1/n.
- `PipelinedMicroBatches` (pp > 1): this rank runs its stages' actions of the pipeline schedule.

Both return the step's summed (loss, lm, mtp, balance) over the micro-batches this pipeline ran,
and `after_backward` finishes the gradients the pipeline split (shared parameters summed).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moetron.models.deepseek_v3.parallelize import all_shared_sets, pipeline_parts
from moetron.parallel.dims import pipeline_subgroups
from moetron.parallel.grad_reduce import sum_shared_gradients
from moetron.pipeline.builders import build_schedule
from moetron.pipeline.runtime import PipelineRunner


class LocalMicroBatches:
    copies: dict = {}  # every parameter lives on this rank only
    bubble_ratio = None  # no pipeline

    def __init__(self, model, device, compute_dtype) -> None:
        self.model, self.device, self.dtype = model, device, compute_dtype

    def run(self, micro_batches, mtp_weight: float) -> torch.Tensor:
        self.model.mtp_loss_weight = mtp_weight
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # on the device: no sync per micro-batch
        for inputs, labels in micro_batches:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                out = self.model(inputs.to(self.device), labels.to(self.device))
            (out.loss / len(micro_batches)).backward()
            parts = (out.loss, out.loss_lm, out.loss_mtp, out.loss_balance)
            for i, t in enumerate(parts):
                sums[i] += _f64(t)
        return sums.cpu()

    def after_backward(self) -> None:
        pass


def _f64(t):
    return 0.0 if t is None else t.detach().double()


def _pipeline_parts(model, cfg, groups, num_micro: int):
    schedule = build_schedule(cfg.parallel.schedule, groups.dims.pp, num_micro)
    layout = [list(ids) for ids in cfg.parallel.layout] if cfg.parallel.layout else None
    return schedule, pipeline_parts(model, schedule, groups.pp_rank, layout, aux_scale=1.0 / num_micro)


class PipelinedMicroBatches:
    @staticmethod
    def held_modules(model, cfg, groups, num_micro: int) -> list:
        """The modules this pipeline rank runs (its stages and, on a last stage, the loss tail)."""
        _, parts = _pipeline_parts(model, cfg, groups, num_micro)
        return [*parts.stage_modules.values(), *([parts.tail] if parts.tail is not None else [])]

    def __init__(self, model, cfg, groups, device, compute_dtype, num_micro: int) -> None:
        self.device, self.dtype, self.pp_group = device, compute_dtype, groups.pp_group
        self.schedule, self.parts = _pipeline_parts(model, cfg, groups, num_micro)
        self.shared_groups = pipeline_subgroups(groups.dims, groups.rank, all_shared_sets(self.parts))
        self.copies = {pid: len(ranks) for pid, ranks in self.parts.holders.items()}
        shape = (cfg.train.micro_batch, cfg.train.seq_len, model.cfg.hidden_size)
        self.runner = PipelineRunner(self.schedule, groups.pp_rank, self.parts.stage_modules, groups.lanes("pp"), shape,
                                     overlap=cfg.parallel.overlap_fb, device=device)

    def run(self, micro_batches, mtp_weight: float) -> torch.Tensor:
        n = len(micro_batches)
        inputs = {i: x.to(self.device) for i, (x, _) in enumerate(micro_batches)}
        targets = {i: (x.to(self.device), y.to(self.device)) for i, (x, y) in enumerate(micro_batches)}
        tail = self.parts.tail
        if tail is not None:
            tail.mtp_loss_weight = mtp_weight
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            self.runner.step(inputs, targets, tail, loss_scale=1.0 / n)
        # the stages kept their losses on the device: add them up here, with no sync inside the schedule
        lm = mtp = balance = torch.zeros((), dtype=torch.float64, device=self.device)
        if tail is not None:
            for lm_i, mtp_i, balance_i in tail.losses_seen:
                lm, mtp, balance = lm + _f64(lm_i), mtp + _f64(mtp_i), balance + _f64(balance_i)
            tail.losses_seen.clear()
        for stage in {id(s): s for s in self.parts.stage_modules.values()}.values():
            for balance_i in stage.balance_seen:
                balance = balance + _f64(balance_i)
            stage.balance_seen.clear()
        idle = torch.tensor(1.0 - self.runner.busy_s / max(self.runner.step_s, 1e-12), dtype=torch.float64,
                            device=self.device)
        sums_idle = torch.stack([lm + mtp + balance, lm, mtp, balance, idle])
        if self.pp_group is not None:  # each stage knows its part: add up the pipeline (on the device, for NCCL)
            dist.all_reduce(sums_idle, group=self.pp_group)
        sums_idle = sums_idle.cpu()
        self.bubble_ratio = float(sums_idle[4]) / self.schedule.num_ranks  # idle share of the step, mean over ranks
        return sums_idle[:4]

    def after_backward(self) -> None:
        sum_shared_gradients(self.parts.shared, self.shared_groups)

"""The step finalizer's metrics reduction: every statistic of a step summed over all ranks in one
all-reduce, shapes and names kept."""
import torch
import torch.distributed as dist
from torch import nn

from moetron.parallel.dims import ParallelDims, Topology, build_groups
from moetron.parallel.finalize import StepFinalizer
from tests.dist.harness import run_ranks


def _reduce(rank, world):
    groups = build_groups(ParallelDims(pp=1, dp=world, ep=1), Topology(1, world), rank)
    finalizer = StepFinalizer(nn.Linear(2, 2), [], groups, grad_clip=0.0)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    try:
        out = finalizer.reduce_metrics({"losses": torch.full((4,), float(rank), dtype=torch.float64),
                                        "loads_LE": torch.arange(6, dtype=torch.float64).view(2, 3) * (rank + 1),
                                        "idle": torch.tensor(0.25, dtype=torch.float64)})
    finally:
        dist.all_reduce = real
    return len(calls), out


def test_metrics_are_summed_in_one_all_reduce():
    results = run_ranks(3, _reduce)
    for calls, out in results:
        assert calls == 1
        assert list(out) == ["losses", "loads_LE", "idle"]
        assert torch.equal(out["losses"], torch.full((4,), 3.0, dtype=torch.float64))  # 0 + 1 + 2
        assert torch.equal(out["loads_LE"], torch.arange(6, dtype=torch.float64).view(2, 3) * 6)
        assert out["idle"].shape == () and float(out["idle"]) == 0.75

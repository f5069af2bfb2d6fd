"""The step finalizer: every statistic of a step summed over all ranks in one all-reduce, shapes and
names kept; ZeRO-1's communication overlapped with compute (the gather with the next forward, the
reduce-scatter with the last backward) equal to the blocking one."""
import copy

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


def _overlapped_gather(rank, world):
    """ZeRO-1's updated shards gathered asynchronously: a module's parameters are stale until its
    forward (or finish_gather) lands their bucket, and then equal what a blocking gather gives."""
    import torch.distributed as dist

    from moetron.parallel.zero1 import ShardedParams

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    params = list(model.parameters())
    sharded = ShardedParams(params, dist.group.WORLD, world, rank, bucket_numel=50)  # a bucket per layer
    sharded.wait_before_forward(model)
    for shard in sharded.shards:
        shard.data.add_(1.0)  # what an optimizer step would do to every rank's shard
    before = [p.detach().clone() for p in params]
    sharded.all_gather_params(async_op=True)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing landed yet
    x = torch.randn(4, 6)
    model[0](x)  # the first layer's forward lands its own bucket only
    landed = [not torch.equal(p, b) for p, b in zip(params, before)]
    sharded.finish_gather()
    return len(sharded.buckets), landed, [p.detach().clone() for p in params], [b + 1.0 for b in before]


def test_an_overlapped_parameter_gather_lands_each_bucket_when_its_module_runs():
    for buckets, landed, after, expected in run_ranks(2, _overlapped_gather):
        assert buckets == 2
        assert landed[:2] == [True, True] and landed[2:] == [False, False]
        assert all(torch.equal(a, e) for a, e in zip(after, expected))


def _overlapped_reduce(rank, world):
    """ZeRO-1's reduce-scatter started from the last backward's gradient hooks: the later layer's
    bucket is under way before the backward ends, and the shards' gradients equal a blocking one's."""
    import torch.distributed as dist

    from moetron.parallel.zero1 import ShardedParams

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    plain = copy.deepcopy(model)
    overlapped = ShardedParams(list(model.parameters()), dist.group.WORLD, world, rank, bucket_numel=50)
    overlapped.overlap_reduce_with_backward()
    blocking = ShardedParams(list(plain.parameters()), dist.group.WORLD, world, rank, bucket_numel=50)
    started_during_backward = []
    model[0].weight.register_hook(lambda g: started_during_backward.append(sorted(overlapped._reducing)) or g)
    x = torch.randn(2, 4, 6) * (rank + 1)
    for i in range(2):  # two micro-batches; the second backward is the last
        if i == 1:
            overlapped.arm_reduce()
        model(x[i]).sum().backward()
        plain(x[i]).sum().backward()
    overlapped.reduce_scatter_grads(0.5)
    blocking.reduce_scatter_grads(0.5)
    return started_during_backward, [s.grad for s in overlapped.shards], [s.grad for s in blocking.shards]


def test_an_overlapped_reduce_scatter_starts_during_the_last_backward_and_equals_a_blocking_one():
    for started, overlapped, blocking in run_ranks(2, _overlapped_reduce):
        assert started == [[], [1]]  # first backward: nothing; the last: the second layer's bucket
        assert all(torch.equal(a, b) for a, b in zip(overlapped, blocking))

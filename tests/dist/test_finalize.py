"""Every statistic of a step summed over all ranks in one all-reduce, shapes and names kept; ZeRO-1's
parameter gather overlapped with the next forward, equal to the blocking one (the gradient buffers'
overlap: tests/dist/test_grad_buffer.py)."""
import torch
import torch.distributed as dist
from torch import nn

from moetron.parallel.dims import ParallelDims, Topology, build_groups
from tests.dist.harness import run_ranks


def _reduce(rank, world):
    from moetron.comm.packed import all_reduce_packed

    build_groups(ParallelDims(pp=1, dp=world, ep=1), Topology(1, world), rank)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    try:
        out = all_reduce_packed({"losses": torch.full((4,), float(rank), dtype=torch.float64),
                                 "loads_LE": torch.arange(6, dtype=torch.float64).view(2, 3) * (rank + 1),
                                 "idle": torch.tensor(0.25, dtype=torch.float64)}, world_size=world)
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
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # nothing landed yet
    x = torch.randn(4, 6)
    model[0](x)  # the first layer's forward lands its own bucket only
    landed = [not torch.equal(p, b) for p, b in zip(params, before, strict=True)]
    sharded.finish_gather()
    return len(sharded.buckets), landed, [p.detach().clone() for p in params], [b + 1.0 for b in before]


def test_an_overlapped_parameter_gather_lands_each_bucket_when_its_module_runs():
    for buckets, landed, after, expected in run_ranks(2, _overlapped_gather):
        assert buckets == 2
        assert landed[:2] == [True, True] and landed[2:] == [False, False]
        assert all(torch.equal(a, e) for a, e in zip(after, expected, strict=True))

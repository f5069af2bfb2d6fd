"""The one gradient buffer of plain data parallelism and ZeRO-1: every parameter's gradient a view
of it; with overlap, a bucket's collective starts during the step's last backward, as soon as its
gradients are final, and the result is bitwise the blocking one's; a gradient that arrives after
its bucket started is refused, not lost."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moetron.parallel.grad_buffer import GradBuffer
from tests.dist.harness import run_ranks


def _buffers(rank, world, sharded):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    plain = copy.deepcopy(model)

    def buffer(m, overlap):  # reversed model order: the order a backward finishes them; a bucket per layer
        return GradBuffer(list(m.parameters())[::-1], dist.group.WORLD, world, rank, sharded, bucket_numel=40,
                          overlap=overlap)

    overlapped, blocking = buffer(model, True), buffer(plain, False)
    overlapped.attach()
    blocking.attach()
    return model, plain, overlapped, blocking


def _overlap(rank, world, sharded):
    model, plain, overlapped, blocking = _buffers(rank, world, sharded)
    views = [p.grad.data_ptr() for p in model.parameters()]
    started_during_backward = []  # the first layer's gradient is computed after the second layer's are final
    model[0].weight.register_hook(lambda g: started_during_backward.append(overlapped.started) or g)
    x = torch.randn(2, 4, 6) * (rank + 1)
    for i in range(2):  # two micro-batches; the second backward is the last
        if i == 1:
            overlapped.expect_final(model.parameters())
        model(x[i]).sum().backward()
        if i == 1:
            overlapped.mark_final(model.parameters())
        plain(x[i]).sum().backward()
    overlapped.finish(0.5)
    blocking.finish(0.5)
    same_views = views == [p.grad.data_ptr() for p in model.parameters()]  # accumulated in place
    got = overlapped.shard_grads if sharded else [p.grad for p in model.parameters()]
    want = blocking.shard_grads if sharded else [p.grad for p in plain.parameters()]
    return started_during_backward, same_views, got, want, len(overlapped.buckets)


@pytest.mark.parametrize("sharded", [False, True], ids=["all_reduce", "zero1_reduce_scatter"])
def test_an_overlapped_bucket_starts_during_the_last_backward_and_equals_the_blocking_one(sharded):
    for started, same_views, got, want, buckets in run_ranks(2, _overlap, sharded):
        assert buckets == 2
        assert started == [[], [0]]  # first backward: nothing; the last: the second layer's bucket (bucket 0)
        assert same_views
        assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))  # bitwise


def _sums(rank, world, sharded):
    _, plain, _, buffer = _buffers(rank, world, sharded)
    for p in plain.parameters():
        p.grad.fill_(rank + 1.0)
    buffer.finish(1.0 / world)
    grads = buffer.shard_grads if sharded else [p.grad for p in buffer.params]
    return [g.clone() for g in grads[::-1]]  # model order


@pytest.mark.parametrize("sharded", [False, True], ids=["all_reduce", "zero1_reduce_scatter"])
def test_the_buffer_averages_over_the_group(sharded):
    for rank, grads in enumerate(run_ranks(2, _sums, sharded)):
        # the mean of 1 and 2; a ZeRO-1 shard holds ceil(rows / 2) rows, the padding rows zeros
        for g, p in zip(grads, [(5, 6), (5,), (3, 5), (3,)], strict=True):
            rows = p[0] if not sharded else min(-(-p[0] // 2), p[0] - rank * -(-p[0] // 2))
            assert torch.equal(g[:rows], torch.full((rows, *p[1:]), 1.5))
            assert not g[rows:].any()


def _late(rank, world):
    model, _, overlapped, _ = _buffers(rank, world, False)
    overlapped.mark_final(model.parameters())  # final too early: every bucket starts now
    try:
        model(torch.randn(2, 6)).sum().backward()
    except RuntimeError as err:
        return str(err)
    finally:
        overlapped.finish(1.0)
    return None


def test_a_gradient_after_its_bucket_started_is_refused():
    for message in run_ranks(2, _late):
        assert message is not None and "after its bucket's reduction started" in message


def _bounded(rank, world):
    from moetron.parallel.grad_buffer import MAX_PACKED_IN_FLIGHT

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    buffer = GradBuffer(list(model.parameters())[::-1], dist.group.WORLD, world, rank, True, bucket_numel=16,
                        overlap=True)
    buffer.attach()
    in_flight = []
    real_start = buffer._start
    buffer._start = lambda b: (real_start(b), in_flight.append(len(buffer._works)))
    buffer.expect_final(model.parameters())
    model(torch.randn(3, 4) * (rank + 1)).sum().backward()
    buffer.finish(0.5)
    return len(buffer.buckets), in_flight, MAX_PACKED_IN_FLIGHT


def test_zero1_keeps_a_bounded_number_of_packed_buckets_in_flight():
    """Each reduce-scatter holds its bucket packed rank-major until it is done: a start beyond the
    bound lands the oldest first, so the packed copies of a whole model's gradients never live at once."""
    for buckets, in_flight, bound in run_ranks(2, _bounded):
        assert buckets == 12 and len(in_flight) == 12  # a bucket per weight and per bias, all started in the backward
        assert max(in_flight) == bound

"""BF16 working weights with float32 master weights (DeepSeek-V3 report section 3.3): gradients
accumulate and reduce in float32, the optimizer steps on the float32 masters (ZeRO-1's shards, or
whole ones without it), and each step leaves every parameter equal to its master rounded to BF16.
Held bitwise to a by-hand reference that does each of those steps on whole tensors."""
import pytest
import torch
from torch import nn

from moetron.parallel.dims import ParallelDims, Topology, build_groups
from tests.dist.harness import run_ranks

STEPS, MICRO = 2, 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))


def _batch(step: int, rank: int, micro: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + 10 * rank + micro))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x.to(next(model.parameters()).dtype)).float().square().mean()


def _train(rank, world, zero1):
    from moetron.parallel.finalize import StepFinalizer
    from moetron.parallel.grad_buffer import accumulated_grad

    groups = build_groups(ParallelDims(pp=1, dp=world, ep=1), Topology(1, world), rank)
    model = _model()
    finalizer = StepFinalizer(model, [], groups, grad_clip=0.0, zero1=zero1, param_dtype=torch.bfloat16)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([finalizer.stepped_on(p) for p in params], lr=0.1, foreach=False)
    seen = []
    for step in range(STEPS):
        for micro in range(MICRO):
            _loss(model, _batch(step, rank, micro)).backward()
        seen.append(([p.dtype for p in params], [p.grad for p in params],
                     [accumulated_grad(p).dtype for p in params]))
        finalizer.finish_gradients()
        optimizer.step()
        finalizer.after_optimizer_step()
    masters = [m.detach().clone() for m in (finalizer.stepped_on(p) for p in params)]
    return seen, [p.detach().clone() for p in params], masters


def _reference(world):
    """Whole tensors by hand: BF16 copies of float32 masters, each micro-batch's BF16 gradient added
    into float32 sums per rank, the ranks' sums added and averaged, AdamW on the masters."""
    masters = [p.detach().clone() for p in _model().parameters()]
    optimizer = torch.optim.AdamW(masters, lr=0.1, foreach=False)
    working = _model().to(torch.bfloat16)
    for step in range(STEPS):
        with torch.no_grad():
            for w, m in zip(working.parameters(), masters):
                w.copy_(m)
        per_rank = []
        for rank in range(world):
            sums = [torch.zeros_like(m) for m in masters]
            for micro in range(MICRO):
                working.zero_grad()
                _loss(working, _batch(step, rank, micro)).backward()
                for s, w in zip(sums, working.parameters()):
                    s.add_(w.grad)
            per_rank.append(sums)
        for m, *grads in zip(masters, *per_rank):
            m.grad = torch.stack(grads).sum(0) * (1.0 / world) if world > 1 else grads[0] * 1.0
        optimizer.step()
    return masters


@pytest.mark.parametrize("world,zero1", [(1, False), (2, False), (2, True)], ids=["one-rank", "dp2", "dp2-zero1"])
def test_bf16_weights_step_on_float32_masters_as_by_hand(world, zero1):
    expected = _reference(world)
    for rank, (seen, params, masters) in enumerate(run_ranks(world, _train, zero1)):
        for dtypes, grads, grad_dtypes in seen:
            assert set(dtypes) == {torch.bfloat16} and set(grad_dtypes) == {torch.float32}
            assert all(g is None for g in grads)  # autograd's BF16 gradient went into the float32 sum
        for p, m, e in zip(params, masters, expected, strict=True):
            assert m.dtype == torch.float32
            assert torch.equal(p, e.to(torch.bfloat16))  # the working weights: the whole master, rounded
            if zero1:  # this rank's rows of it (dim 0 zero-padded up to an even split)
                r = m.shape[0]
                assert r == -(-e.shape[0] // world)
                padded = torch.cat([e, e.new_zeros(r * world - e.shape[0], *e.shape[1:])])
                assert torch.equal(m, padded[rank * r:(rank + 1) * r])
            else:
                assert torch.equal(m, e)


def _deferred(rank, world):
    from moetron.core.weight_grads import WeightGradStore
    from moetron.parallel.grad_buffer import GradBuffer

    w = nn.Parameter(torch.zeros(3, 2, dtype=torch.bfloat16))
    buffer = GradBuffer([w], None, 1, 0, grad_dtype=torch.float32)
    buffer.attach()
    store = WeightGradStore()
    store.accumulate(w, torch.full((3, 2), 1.0 + 2 ** -12))  # a W action's gradient, rounded as autograd rounds
    (w * torch.full((3, 2), 3.0, dtype=torch.bfloat16)).sum().backward()
    return w.grad, w.main_grad.clone()


def test_deferred_and_autograd_gradients_both_land_in_the_float32_main_gradient():
    grad, main = run_ranks(1, _deferred)[0]
    assert grad is None and main.dtype == torch.float32
    assert torch.equal(main, torch.full((3, 2), 4.0))  # 1 + 2^-12 rounds to 1 in BF16, then + 3

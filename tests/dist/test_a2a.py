"""The differentiable all-to-all with uneven (and empty) splits, synchronous and asynchronous, and
its packed form (several tensors in one exchange)."""
import torch

from moetron.comm.a2a import PendingAllToAll, all_to_all, all_to_all_packed, exchange_counts
from tests.dist.harness import run_ranks


def _exchange(rank, world):
    # rank r sends (r + p) % 3 rows to peer p (some zero), each row tagged [r, p, row]
    send = torch.tensor([(rank + p) % 3 for p in range(world)])
    rows = [torch.tensor([[rank, p, i]], dtype=torch.float32) for p in range(world) for i in range(int(send[p]))]
    x = (torch.cat(rows) if rows else torch.zeros(0, 3)).requires_grad_()
    recv = exchange_counts(send, torch.distributed.group.WORLD)
    pending = all_to_all(x, send.tolist(), recv.tolist(), torch.distributed.group.WORLD, async_op=True)
    assert isinstance(pending, PendingAllToAll)
    y = pending.wait()
    (y * torch.arange(1, y.shape[0] + 1, dtype=torch.float32)[:, None]).sum().backward()
    return {"recv": recv, "y": y.detach(), "grad": x.grad}


def test_uneven_async_all_to_all_and_its_gradient():
    world = 3
    results = run_ranks(world, _exchange)
    for rank, res in enumerate(results):
        assert res["recv"].tolist() == [(src + rank) % 3 for src in range(world)]
        expected = [[src, rank, i] for src in range(world) for i in range((src + rank) % 3)]
        assert res["y"].tolist() == expected
    for rank, res in enumerate(results):
        # the gradient of a received row is its position (1-based) at the receiver, sent back
        expected = [[rank, p, i] for p in range(world) for i in range((rank + p) % 3)]
        for row, (_, peer, i) in zip(res["grad"], expected, strict=True):
            position = [tuple(r) for r in results[peer]["y"].tolist()].index((rank, peer, i)) + 1
            assert row.tolist() == [position] * 3


def _packed_beside_separate(rank, world):
    """The same rows of three dtypes and shapes, exchanged packed and one tensor at a time."""
    torch.manual_seed(rank)
    send = [(rank * 2 + p) % 4 if rank else 0 for p in range(world)]  # uneven, some empty, rank 0 sends none
    recv = exchange_counts(torch.tensor(send), torch.distributed.group.WORLD).tolist()
    n = sum(send)
    x = torch.randn(n, 5, requires_grad=True)
    gates = torch.randn(n, 2, 3).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(-1, 100, (n, 3))
    group = torch.distributed.group.WORLD
    out = {}
    for how in ("packed", "separate"):
        if how == "packed":
            x_m, gates_m, ids_m = all_to_all_packed([x, gates, ids], send, recv, group)
        else:
            x_m, gates_m, ids_m = (all_to_all(t, send, recv, group) for t in (x, gates, ids))
        weights = torch.arange(1, x_m.shape[0] + 1, dtype=torch.float32)
        ((x_m * weights[:, None]).sum() + (gates_m.float() * weights[:, None, None]).sum() * 0.5).backward()
        out[how] = (x_m.detach(), gates_m.detach(), ids_m, x.grad.clone(), gates.grad.clone())
        x.grad, gates.grad = None, None
    return out, ids_m.requires_grad


def test_packed_all_to_all_equals_one_exchange_per_tensor():
    for out, ids_need_grad in run_ranks(3, _packed_beside_separate):
        assert not ids_need_grad
        for packed, separate in zip(out["packed"], out["separate"], strict=True):
            assert packed.dtype == separate.dtype and torch.equal(packed, separate)

"""The differentiable all-to-all with uneven (and empty) splits, synchronous and asynchronous."""
import torch

from moetron.comm.a2a import PendingAllToAll, all_to_all, exchange_counts
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
        for row, (_, peer, i) in zip(res["grad"], [[rank, p, i] for p in range(world) for i in range((rank + p) % 3)]):
            position = [tuple(r) for r in results[peer]["y"].tolist()].index((rank, peer, i)) + 1
            assert row.tolist() == [position] * 3

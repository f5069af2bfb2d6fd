import torch
import torch.distributed as dist

from tests.dist.harness import run_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def test_ranks_meet_and_return_results():
    assert run_ranks(3, _sum_ranks) == [3.0, 3.0, 3.0]

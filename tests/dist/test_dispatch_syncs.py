"""Under expert parallelism the host learns each exchange's split sizes once per hop of a dispatch
(one `.tolist()` of the exchanged row and pair counts), not per tensor; the rest of the dispatch,
the combine and the backward read nothing: counted on every rank over a forward and backward of
the tiny model, as tests/unit/test_host_syncs.py counts them."""
import copy

import pytest
import torch

from moetron.models.deepseek_v3 import load_preset
from moetron.models.deepseek_v3.model import DeepSeekV3
from moetron.models.common.parallelize import parallelize
from moetron.parallel.dims import ParallelDims, Topology, build_groups
from tests.dist.harness import run_ranks
from tests.unit.test_host_syncs import SyncCounter, counting_tolist


def syncs_per_step(rank, world, nodes, dispatcher):
    torch.manual_seed(0)
    cfg = load_preset("tiny", n_routed_experts=8, n_group=nodes, topk_group=1)
    model = copy.deepcopy(DeepSeekV3(cfg).train())
    groups = build_groups(ParallelDims(pp=1, dp=1, ep=world), Topology(nodes, world // nodes), rank)
    parallelize(model, groups, dispatcher)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(rank))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()  # warm-up
    with SyncCounter() as counter, counting_tolist(counter):
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
    moe_layers = sum(1 for m in model.modules() if type(m).__name__ == "MoE")
    return dict(counter.ops), moe_layers


@pytest.mark.parametrize("nodes,dispatcher,hops", [(1, "alltoall", 1), (2, "hierarchical", 2)])
def test_one_host_read_per_hop_of_a_dispatch(nodes, dispatcher, hops):
    for ops, moe_layers in run_ranks(4, syncs_per_step, nodes, dispatcher):
        assert ops == {"tolist": hops * moe_layers}, (ops, moe_layers)  # nothing else, forward or backward

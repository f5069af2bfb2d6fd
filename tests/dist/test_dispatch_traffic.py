"""Traffic accounting against the bytes the exchanges really moved, and the once-per-node rule."""
import pytest
import torch
import torch.distributed as dist

import moetron.comm.dispatch.hop as hop_module
from moetron.comm.lanes import resolve
from moetron.comm.traffic import TrafficCounter
from moetron.parallel.dims import ParallelDims, Topology, build_groups
from moetron.parallel.expert_parallel import make_dispatcher
from tests.dist.harness import run_ranks

NUM_EXPERTS, TOKENS, K, H = 16, 40, 4, 8


def _traffic(rank, world, nodes, dispatcher_name):
    topo = Topology(nodes, world // nodes)
    groups = build_groups(ParallelDims(pp=1, dp=1, ep=world), topo, rank)
    traffic = TrafficCounter()
    dispatcher = make_dispatcher(dispatcher_name, NUM_EXPERTS, groups, traffic)

    moved = {"nvlink": 0, "ib": 0}
    ib_arrivals = []  # token ids that reached this rank over the inter-node hop
    phase = ["dispatch"]
    real_all_to_all, real_packed = hop_module.all_to_all, hop_module.all_to_all_packed

    def record(parts, send, group):
        group = resolve(group)
        peers = dist.get_process_group_ranks(group) if group is not None else [rank]
        row_bytes = sum(part[0].numel() * part.element_size() for part in parts) if parts[0].shape[0] else 0
        for peer, rows in zip(peers, send, strict=True):
            if peer != rank and rows:
                moved["nvlink" if topo.node_of(peer) == topo.node_of(rank) else "ib"] += rows * row_bytes

    def recording_packed(parts, send, recv, group):  # a dispatch hop's gates and expert ids
        out = real_packed(parts, send, recv, group)
        record(parts, send, group)
        return out

    def recording_all_to_all(x, send, recv, group):  # token rows (dispatch), partial outputs (combine)
        out = real_all_to_all(x, send, recv, group)
        record([x], send, group)
        if dispatcher_name == "hierarchical" and phase == ["dispatch"] and resolve(group) is groups.ib_group:
            ib_arrivals.extend(out[:, 0].tolist())
        return out

    hop_module.all_to_all, hop_module.all_to_all_packed = recording_all_to_all, recording_packed
    torch.manual_seed(rank)
    token_ids = torch.arange(TOKENS, dtype=torch.float32) + rank * TOKENS
    x = token_ids[:, None].repeat(1, H).requires_grad_()
    topk = torch.stack([torch.randperm(NUM_EXPERTS)[:K] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, K, requires_grad=True)
    x_recv, counts, handle = dispatcher.dispatch(x, topk, weights)
    phase[0] = "combine"
    y = dispatcher.combine(x_recv * 2.0, handle)
    y.sum().backward()
    hop_module.all_to_all, hop_module.all_to_all_packed = real_all_to_all, real_packed

    node_arrivals = [None] * world
    dist.all_gather_object(node_arrivals, (topo.node_of(rank), ib_arrivals))
    counted = traffic.take()
    return {"counted": counted, "moved": moved, "node_arrivals": node_arrivals,
            "y_ok": torch.allclose(y, 2.0 * x.detach() * weights.detach().sum(1, keepdim=True))}


@pytest.mark.parametrize("dispatcher", ["alltoall", "hierarchical"])
def test_counters_equal_bytes_moved_and_tokens_cross_to_a_node_once(dispatcher):
    results = run_ranks(8, _traffic, 2, dispatcher)
    for res in results:
        assert res["y_ok"]  # dispatch + combine of 2x returns 2x times the gate sum
        # forward dispatch and combine (the backward's exchanges are not dispatcher traffic)
        assert res["counted"] == res["moved"]
        assert res["counted"]["ib"] > 0 and res["counted"]["nvlink"] > 0
    if dispatcher == "hierarchical":
        per_node: dict[int, list] = {}
        for node, ids in results[0]["node_arrivals"]:
            per_node.setdefault(node, []).extend(ids)
        for node, ids in per_node.items():
            assert ids and len(ids) == len(set(ids)), f"a token crossed to node {node} twice"

"""The DeepEP dispatcher (our adapter of deep_ep.Buffer) on gloo, with tests/fakes/fake_deep_ep.py
standing in for DeepEP: the same single-process comparisons as the other dispatchers (layer, whole
model, pipelined with overlapped F&B pairs), its traffic counters against the hierarchical
dispatcher's, and bfloat16 on the wire.

This checks our side of the contract (layout call, local expert ids, gates and their gradients,
the cached dispatch in backward, one buffer per lane); DeepEP's kernels themselves need CUDA GPUs.
"""
import sys

import pytest
import torch
import torch.distributed as dist

from moetron.comm.dispatch.deepep import DeepEPBuffers, DeepEPDispatcher
from moetron.comm.traffic import TrafficCounter
from moetron.models.deepseek_v3.block import deepseek_moe
from moetron.parallel.dims import ParallelDims, Topology, build_groups
from moetron.parallel.expert_parallel import make_dispatcher
from tests.dist.harness import run_ranks
from tests.dist.test_expert_parallel import ep_vs_reference, moe_cfg, rel_error
from tests.dist.test_expert_parallel_model import model_ep
from tests.dist.test_pipeline_expert_parallel import pair_turns, pp_ep
from tests.fakes import fake_deep_ep


@pytest.fixture
def deep_ep(monkeypatch):
    """`import deep_ep` finds the stand-in; rows travel as they are unless a test says bfloat16."""
    monkeypatch.setitem(sys.modules, "deep_ep", fake_deep_ep)
    monkeypatch.setattr(DeepEPDispatcher, "wire_dtype", None)
    monkeypatch.setattr(fake_deep_ep, "made", [])
    return fake_deep_ep


def _buffers_made():
    return [(id(b.group), b.calls) for b in fake_deep_ep.made]


def _layer(rank, world, nodes, node_limited):
    out = ep_vs_reference(rank, world, nodes, "deepep", node_limited)
    out["buffers"] = _buffers_made()
    return out


@pytest.mark.parametrize("ep,nodes,node_limited", [(2, 1, False), (4, 2, True), (8, 2, False)])
def test_deepep_layer_matches_single_process(deep_ep, ep, nodes, node_limited):
    results = run_ranks(ep, _layer, nodes, node_limited)
    assert (results[0]["loads"] == 0).any(), "the skew should leave some experts without tokens"
    for rank, res in enumerate(results):
        y, y_ref = res["y"]
        assert rel_error(y, y_ref) < 1e-6, f"rank {rank}"
        assert len(res["grads"]) == 1 + len(list(_ref_layer_params(nodes, node_limited)))
        for name, (grad, ref) in res["grads"].items():
            assert rel_error(grad, ref) < 1e-5, f"rank {rank} {name}"
        # one buffer (no lanes without a pipeline): forward dispatch + combine, backward combine + dispatch
        assert len(res["buffers"]) == 1 and res["buffers"][0][1] == 4


def _ref_layer_params(nodes, node_limited):
    return deepseek_moe(moe_cfg(nodes, node_limited), 1).parameters()


def _whole_model(rank, world):
    out = model_ep(rank, world, 1, 4, 2, "deepep")
    out["buffers"] = _buffers_made()
    return out


def test_deepep_whole_model_matches_single_process(deep_ep):
    """All MoE layers (and MTP's) share one buffer; routing biases update alike."""
    results = run_ranks(4, _whole_model)
    for res in results:
        assert len(res["buffers"]) == 1 and res["grads"]
        for name, (grad, ref) in res["grads"].items():
            assert rel_error(grad, ref) < 1e-5, name
        for name, (bias, ref) in res["biases"].items():
            assert torch.equal(bias, ref), name


def _pipelined(rank, world, ordered):
    out = pp_ep(rank, world, 2, 1, 2, "dualpipev", True, 4, "deepep", ordered)
    out["buffers"] = _buffers_made()
    return out


@pytest.mark.parametrize("ordered", [False, True])
def test_deepep_under_overlapped_pipeline_uses_one_buffer_per_lane(deep_ep, ordered):
    """DualPipeV PP2 x EP2 with F&B overlap: forward exchanges on lane 0's buffer, backward ones on
    lane 1's, never two calls on one buffer at once (the stand-in raises), gradients as one process.
    Ordered (the default under NCCL), DeepEP's calls take turns like any collective."""
    results = run_ranks(4, _pipelined, ordered)
    for res in results:
        for name, (grad, ref) in res["grads"].items():
            assert grad is not None, name
            assert rel_error(grad, ref) < 1e-5, name
        groups = [group for group, _ in res["buffers"]]
        assert len(groups) == 2 and groups[0] != groups[1], res["buffers"]
        assert all(calls > 0 for _, calls in res["buffers"])
    if ordered:  # a dispatch and a combine each way: the halves alternate, lane 0 first
        turns = [lanes for res in results for lanes in pair_turns(res["order_log"])]
        assert [0, 1, 0, 1] in turns
        assert all(lanes in ([0, 1] * 2, [0] * len(lanes), [1] * len(lanes)) for lanes in turns), turns


def _traffic_beside_hierarchical(rank, world, nodes):
    topo = Topology(nodes, world // nodes)
    groups = build_groups(ParallelDims(pp=1, dp=1, ep=world), topo, rank)
    torch.manual_seed(rank)
    x = torch.randn(40, 8, requires_grad=True)
    topk = torch.stack([torch.randperm(16)[:4] for _ in range(40)])
    weights = torch.rand(40, 4, requires_grad=True)
    totals, outputs = {}, {}
    for name in ("deepep", "hierarchical"):
        traffic = TrafficCounter()
        dispatcher = make_dispatcher(name, 16, groups, traffic)
        x_recv, counts, handle = dispatcher.dispatch(x, topk, weights)
        outputs[name] = dispatcher.combine(x_recv * 2.0, handle)
        counted = traffic.take()
        summed = torch.tensor([counted["ib"], counted["nvlink"]])
        dist.all_reduce(summed)
        totals[name] = summed.tolist()
    expected = 2.0 * x.detach() * weights.detach().sum(1, keepdim=True)
    return totals, {name: torch.allclose(y, expected) for name, y in outputs.items()}


def test_deepep_traffic_totals_equal_the_hierarchical_path(deep_ep):
    """DeepEP moves what the two-hop path moves: a row per destination node over IB, then a row per
    further rank over NVLink, both directions; summed over the EP group the counters agree."""
    for totals, correct in run_ranks(8, _traffic_beside_hierarchical, 2):
        assert correct == {"deepep": True, "hierarchical": True}
        assert totals["deepep"] == totals["hierarchical"] and min(totals["deepep"]) > 0


def _bf16_wire(rank, world):
    DeepEPDispatcher.wire_dtype = torch.bfloat16
    return ep_vs_reference(rank, world, 1, "deepep", False)


def test_deepep_bfloat16_wire_keeps_the_model_dtype(deep_ep):
    """Rows cross as bfloat16 (DeepEP's only type) and come back as float32 for the experts."""
    for res in run_ranks(2, _bf16_wire):
        y, y_ref = res["y"]
        assert y.dtype == torch.float32
        assert 0 < rel_error(y, y_ref) < 2e-2  # bfloat16 rounding of tokens and partial outputs, no more
        for name, (grad, ref) in res["grads"].items():
            assert grad.dtype == torch.float32 and rel_error(grad, ref) < 5e-2, name


def test_deepep_missing_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_ep", None)  # import fails
    with pytest.raises(ImportError, match="github.com/deepseek-ai/DeepEP"):
        DeepEPBuffers(None)

"""FP8 dispatch under expert parallelism: the experts receive each token row as E4M3 tiles with
power-of-two scales, dequantized, over one hop or two, and so the gradient of their outputs in the
combine's backward; the outputs and the dispatched rows' gradients go back unquantized."""
import copy

import pytest
import torch
import torch.distributed as dist

from moetron.comm.dispatch.local import LocalDispatcher
from moetron.comm.traffic import TrafficCounter
from moetron.models.deepseek_v3.block import deepseek_moe
from moetron.parallel.dims import ParallelDims, Topology, build_groups
from moetron.parallel.expert_parallel import make_dispatcher, shard_experts
from moetron.precision.fp8_dispatch import FP8DispatchCodec
from moetron.precision.quantize import quantize_tiles
from tests.dist.harness import run_ranks
from tests.dist.test_expert_parallel import NUM_EXPERTS, TOKENS_PER_RANK, moe_cfg, rel_error


def _moe_pair(rank, world, nodes, dispatcher):
    torch.manual_seed(0)
    cfg = moe_cfg(nodes, node_limited=False)
    reference = deepseek_moe(cfg, 1)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x_all = torch.randn(world, 1, TOKENS_PER_RANK, cfg.hidden_size) * torch.logspace(-2, 1, cfg.hidden_size)
    g_all = torch.randn_like(x_all)
    groups = build_groups(ParallelDims(pp=1, dp=1, ep=world), Topology(nodes, world // nodes), rank)
    outputs = {}
    for name, codec in (("fp8", FP8DispatchCodec()), ("bf16", None)):
        ep = copy.deepcopy(reference)
        shard_experts(ep.experts, groups.ep_rank, world)
        traffic = TrafficCounter()
        ep.dispatcher = make_dispatcher(dispatcher, NUM_EXPERTS, groups, traffic, codec=codec)
        x = x_all[rank].clone().requires_grad_()
        y, _ = ep(x)
        (y * g_all[rank]).sum().backward()
        outputs[name] = (y.detach(), x.grad, traffic.take())
    reference.dispatcher = LocalDispatcher(NUM_EXPERTS, FP8DispatchCodec())  # EP = 1 rounds its rows alike
    x_ref = x_all.clone().requires_grad_()
    y_ref, _ = reference(x_ref.view(1, world * TOKENS_PER_RANK, -1))
    (y_ref.view_as(g_all) * g_all).sum().backward()
    return outputs, y_ref.view_as(x_all)[rank].detach(), x_ref.grad[rank]


@pytest.mark.parametrize("ep,nodes,dispatcher", [(2, 1, "alltoall"), (4, 2, "hierarchical")])
def test_fp8_dispatch_is_bf16_dispatch_of_the_quantized_rows(ep, nodes, dispatcher):
    for rank, (outputs, y_ref, grad_ref) in enumerate(run_ranks(ep, _moe_pair, nodes, dispatcher)):
        y8, grad8, traffic8 = outputs["fp8"]
        y16, _, traffic16 = outputs["bf16"]
        # exactly the rounded rows reached the experts, over one hop or two (power-of-two scales
        # re-quantize exactly): the single process, which rounds its rows alike, to float32 sums
        assert rel_error(y8, y_ref) < 1e-6, f"rank {rank}"
        assert rel_error(grad8, grad_ref) < 1e-5, f"rank {rank}"
        # against unquantized dispatch: within E4M3's rounding (2^-4 of a value, relative)
        assert 0 < rel_error(y8, y16) < 2.0 ** -4, f"rank {rank}"
        sent = sum(traffic8.values())
        assert 0 < sent < sum(traffic16.values())  # float32 rows here: 64 elements cost 256 bytes, not 132


def test_fp8_rows_cost_about_half_of_bf16_at_deepseek_v3_width():
    x = torch.zeros(1, 7168, dtype=torch.bfloat16)
    fp8, bf16 = FP8DispatchCodec().bytes_per_row(x), x.shape[-1] * x.element_size()
    assert fp8 == 7168 + 56 * 4 and 0.5 < fp8 / bf16 < 0.52


def test_fp8_dispatch_in_a_gloo_group_sends_bytes_not_float8():
    """gloo has no float8 collectives: the codec sends E4M3 as uint8 (this runs on gloo)."""
    def exchange(rank, world):
        codec = FP8DispatchCodec()
        x = torch.randn(6, 200) * (rank + 1)
        out = codec.exchange(x, [3, 3], [3, 3], dist.group.WORLD)
        return x, out

    (x0, out0), (x1, out1) = run_ranks(2, exchange)
    expected = quantize_tiles(torch.cat([x0[3:], x1[3:]]), pow2=True).dequantize()  # rank 1 gets the second halves
    assert torch.equal(out1, expected)


def test_the_combines_gradient_reaches_the_experts_as_fp8_tiles():
    """The activation gradient before the experts' down-projection crosses back as E4M3 tiles with
    power-of-two scales (report section 3.3.3), over the combine's exchange (gloo, bytes) or, at
    EP = 1, rounded alike; the combined outputs themselves travel as they are."""
    def send_back(rank, world):
        codec = FP8DispatchCodec()
        y = (torch.randn(6, 200) * (rank + 1)).requires_grad_()
        out = codec.send_back(y, [3, 3], [3, 3], dist.group.WORLD)
        g = torch.randn(6, 200) * 10 ** rank
        out.backward(g)
        return y.detach(), out.detach(), g, y.grad

    (y0, out0, g0, grad0), (y1, out1, g1, grad1) = run_ranks(2, send_back)
    assert torch.equal(out1, torch.cat([y0[3:], y1[3:]]))  # outputs: as they are
    # rank 0 sent its rows 3..5 to rank 1, whose gradient of them comes back quantized
    assert torch.equal(grad0[3:], quantize_tiles(g1[:3], pow2=True).dequantize())
    assert not torch.equal(grad0[3:], g1[:3])
    local = LocalDispatcher(4, FP8DispatchCodec())
    x = torch.randn(5, 200)
    rows_SH, _, handle = local.dispatch(x, torch.tensor([[0, 1]] * 5), torch.ones(5, 2))
    rows_SH = rows_SH.detach().requires_grad_()
    g_TH = torch.randn(5, 200)
    local.combine(rows_SH, handle, weighted=False).backward(g_TH)
    assert torch.equal(rows_SH.grad, quantize_tiles(g_TH, pow2=True).dequantize()[handle.token_idx_S])

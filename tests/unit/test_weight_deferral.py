"""B/W split: a DeferrableLinear's weight gradient waits in the store until W runs it; the converter
swaps modules, sharing their parameters, and never rewrites a class in place."""
import copy

import torch
from torch import nn

from moetron.core.weight_grads import WeightGradStore
from moetron.parallel.weight_grads import DeferrableLinear, defer_weight_grads


def test_weight_gradient_is_deferred_then_equal():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
    deferred = defer_weight_grads(copy.deepcopy(plain), WeightGradStore())
    store = deferred[0].weight_grad_store
    assert all(isinstance(m, DeferrableLinear) for m in (deferred[0], deferred[2]))
    x = torch.randn(5, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    plain(x).square().sum().backward()

    store.enabled = True
    deferred(x2).square().sum().backward()
    store.enabled = False
    store.close_batch()
    assert torch.equal(x2.grad, x.grad)  # the input gradient is there at once (B)
    assert all(p.grad is None for p in deferred.parameters())  # weights wait for W
    store.run_oldest()
    for p, q in zip(deferred.parameters(), plain.parameters(), strict=True):
        assert not p.grad.requires_grad
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)  # float32, same products


def test_grouped_expert_weight_gradient_is_deferred_then_equal():
    from moetron.models.common.experts import GroupedExperts

    torch.manual_seed(0)
    plain = GroupedExperts(4, 16, 8)
    torch.nn.init.normal_(plain.gate_up_proj, std=0.2)
    torch.nn.init.normal_(plain.down_proj, std=0.2)
    deferred = defer_weight_grads(copy.deepcopy(plain), WeightGradStore())
    store = deferred.weight_grad_store
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    plain(x, counts).square().sum().backward()
    store.enabled = True
    deferred(x2, counts).square().sum().backward()
    store.enabled = False
    store.close_batch()
    assert torch.equal(x2.grad, x.grad)
    assert deferred.gate_up_proj.grad is None and deferred.down_proj.grad is None
    store.run_oldest()
    assert torch.equal(deferred.gate_up_proj.grad, plain.gate_up_proj.grad)  # the same grouped GEMM, later
    assert torch.equal(deferred.down_proj.grad, plain.down_proj.grad)


def test_deferred_weight_gradients_under_bf16_autocast_land_in_float32():
    """Under autocast the GEMMs run in bf16 on cast copies; the deferred gradient still reaches the
    float32 parameter, in its dtype, as autograd's own cast would leave it."""
    from moetron.models.common.experts import GroupedExperts

    torch.manual_seed(0)
    plain = nn.ModuleDict({"linear": nn.Linear(16, 16, bias=False), "experts": GroupedExperts(4, 16, 8)})
    torch.nn.init.normal_(plain["experts"].gate_up_proj, std=0.2)
    torch.nn.init.normal_(plain["experts"].down_proj, std=0.2)
    deferred = defer_weight_grads(copy.deepcopy(plain), WeightGradStore())
    store = deferred["linear"].weight_grad_store
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16)

    def loss(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model["experts"](model["linear"](x), counts).float().square().sum()

    loss(plain).backward()
    store.enabled = True
    loss(deferred).backward()
    store.enabled = False
    store.close_batch()
    assert all(p.grad is None for p in deferred.parameters())
    store.run_oldest()
    for p, q in zip(deferred.parameters(), plain.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        assert torch.equal(p.grad, q.grad)  # the same bf16 products, cast once to float32

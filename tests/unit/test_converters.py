"""Module converters behind one protocol: applied in the one order that works whatever order they
are listed in, each weight gradient deferred by the one helper (the per-expert loop included), and
combinations that cannot work refused when the model is built or the config is checked."""
import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from moetron.core.convert import apply_converters
from moetron.core.weight_grads import WeightGradStore
from moetron.models.common.experts import GroupedExperts
from moetron.parallel.weight_grads import DeferrableLinear, WeightGradDeferral
from moetron.precision.convert import FP8Conversion, FP8Recipe
from moetron.precision.fp8_linear import FP8Linear
from moetron.train.config import RootConfig
from moetron.train.validate import validate


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 128, bias=False), nn.ReLU(), nn.Linear(128, 128, bias=False))


def test_fp8_and_deferral_apply_in_the_one_working_order_whatever_the_list_order():
    for listed in ("deferral_first", "fp8_first"):
        model, store = _mlp(), WeightGradStore()
        fp8 = FP8Conversion(FP8Recipe("emulated"), lambda m: [m])
        deferral = WeightGradDeferral(store, lambda m: m)
        apply_converters(model, [deferral, fp8] if listed == "deferral_first" else [fp8, deferral])
        assert all(isinstance(model[i], FP8Linear) and model[i].weight_grad_store is store for i in (0, 2)), listed


def test_a_layer_a_converter_could_not_reach_is_refused():
    model = _mlp()
    apply_converters(model, [WeightGradDeferral(WeightGradStore(), lambda m: m)])  # alone: plain linears deferred
    assert isinstance(model[0], DeferrableLinear)
    with pytest.raises(ValueError, match=r"0 \(DeferrableLinear\) is not FP8: precision.fp8 did not reach it"):
        apply_converters(model, [FP8Conversion(FP8Recipe("emulated"), lambda m: [m])])


class _BackwardOnlyLinear(nn.Module):
    """Stands in for transformer-engine's linear: computes its weight gradient inside its backward."""
    DEFERS_WEIGHT_GRADS = False

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 2))


def test_a_layer_that_cannot_defer_its_weight_gradient_is_refused():
    model = nn.Sequential(nn.Linear(2, 2), _BackwardOnlyLinear())
    with pytest.raises(ValueError, match=r"1 \(_BackwardOnlyLinear\) computes its weight gradient in the backward"):
        apply_converters(model, [WeightGradDeferral(WeightGradStore(), lambda m: m)])


def test_the_transformer_engine_backend_with_a_schedule_of_w_actions_is_refused_before_any_rank_starts():
    cfg = OmegaConf.structured(RootConfig)
    cfg.model = {"arch": "deepseek_v3", "num_hidden_layers": 4}
    cfg.parallel.pp, cfg.parallel.schedule, cfg.train.global_batch = 2, "zb1p", 32
    cfg.precision.fp8, cfg.precision.backend = True, "te"
    with pytest.raises(ValueError, match="precision.backend=te with parallel.schedule=zb1p: transformer-engine"):
        validate(cfg, 2)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "per_expert_loop"])
def test_expert_weight_gradients_are_deferred_on_both_gemm_paths(grouped):
    torch.manual_seed(0)
    plain = GroupedExperts(4, 16, 8)
    for p in plain.parameters():
        nn.init.normal_(p, std=0.1)
    plain.use_grouped_mm = grouped
    deferred, store = copy.deepcopy(plain), WeightGradStore()
    deferred.weight_grad_store = store
    x = torch.randn(10, 16)
    counts = torch.tensor([3, 0, 5, 2])
    plain(x, counts).sum().backward()
    store.enabled = True
    deferred(x, counts).sum().backward()
    store.enabled = False
    store.close_batch()
    assert all(p.grad is None for p in deferred.parameters())  # queued for the W action
    store.run_oldest()
    for p, q in zip(deferred.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # the same products, bitwise

"""The global-batch balance loss (balance_mode=global_aux_loss): ranks that each route half of a
micro-batch, their expert counts summed before the loss is applied, give (as the data-parallel mean
of their losses and gradients) exactly the loss and router gradient of one process routing the whole
micro-batch; the micro-batch loss (aux_loss) does not. And the router z-loss."""
import dataclasses

import pytest

import torch

from moetron.models.common.balance import batch_balance_loss, global_balance_loss
from moetron.models.common.router import RouterSettings, TopKRouter
from tests.dist.harness import run_ranks

SETTINGS = RouterSettings(hidden_size=16, num_experts=8, top_k=2, scores="softmax", balance_mode="global_aux_loss",
                          aux_loss_alpha=0.01)


def _router(settings=SETTINGS) -> TopKRouter:
    router = TopKRouter(settings, layer_idx=0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
    return router.train()


def _tokens() -> torch.Tensor:
    """4 sequences of 6 tokens, skewed towards some experts (so the two halves route differently)."""
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(1))
    x[:2] += 1.5 * torch.randn(16, generator=torch.Generator().manual_seed(2))
    return x


def _loss_and_grad(router: TopKRouter, x: torch.Tensor):
    loss = router(x).balance_loss
    loss.backward()
    return loss.detach(), router.weight.grad.clone()


def _half(rank, world):
    router = _router()
    router.balance_group = torch.distributed.group.WORLD
    loss, grad = _loss_and_grad(router, _tokens()[2 * rank:2 * rank + 2])
    local = _router(dataclasses.replace(SETTINGS, balance_mode="aux_loss"))
    local_loss, _ = _loss_and_grad(local, _tokens()[2 * rank:2 * rank + 2])
    return {"loss": loss, "grad": grad, "local_loss": local_loss}


def test_global_balance_over_two_ranks_equals_one_process_routing_both_halves():
    whole_loss, whole_grad = _loss_and_grad(_router(), _tokens())
    halves = run_ranks(2, _half)
    mean_loss = sum(h["loss"] for h in halves) / 2
    mean_grad = sum(h["grad"] for h in halves) / 2
    # the same sums in another order (float32): 1e-6 relative
    torch.testing.assert_close(mean_loss, whole_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean_grad, whole_grad, rtol=1e-5, atol=1e-9)
    local_mean = sum(h["local_loss"] for h in halves) / 2
    assert abs(float(local_mean / whole_loss) - 1) > 1e-3  # the micro-batch loss of each half differs


def test_one_process_global_balance_is_the_micro_batch_loss_and_z_loss_adds_its_term():
    x = _tokens()
    scores_TE = torch.softmax(x.reshape(-1, 16) @ _router().weight.detach().t(), dim=-1)
    chosen_TK = scores_TE.topk(2, dim=-1).indices
    counts_E = torch.bincount(chosen_TK.flatten(), minlength=8).double()
    torch.testing.assert_close(global_balance_loss(scores_TE, counts_E, 24.0, 2), batch_balance_loss(scores_TE, chosen_TK))
    plain, _ = _loss_and_grad(_router(), x)
    with_z = _router(dataclasses.replace(SETTINGS, z_loss_alpha=0.1))(x).balance_loss
    logits_TE = x.reshape(-1, 16) @ _router().weight.detach().t()
    z = torch.logsumexp(logits_TE, dim=-1).square().mean()
    torch.testing.assert_close(with_z.detach() - plain, 0.1 * z)


def _qwen3_global(rank, world, dp, ep, mode):
    """Qwen3-MoE on 2 ranks (2 sequences each) against one process on all 4, every gradient."""
    import copy

    from moetron.models import build_model, load_preset
    from moetron.models.common.parallelize import parallelize
    from moetron.parallel.dims import ParallelDims, Topology, build_groups
    from moetron.parallel.finalize import StepFinalizer

    torch.manual_seed(0)
    cfg = load_preset("qwen3_moe_tiny", balance_mode=mode, router_aux_loss_coef=0.5, router_z_loss_coef=0.01)
    reference = build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (4, 33))
    model = copy.deepcopy(reference)
    groups = build_groups(ParallelDims(pp=1, dp=dp, ep=ep), Topology(1, world), rank)
    made = parallelize(model, groups, "alltoall")
    finalizer = StepFinalizer(model, made.expert_params, groups, grad_clip=0.0)
    reference(ids[:, :-1], ids[:, 1:]).loss.backward()
    mine = ids[2 * rank:2 * rank + 2]
    model(mine[:, :-1], mine[:, 1:]).loss.backward()
    finalizer.finish_gradients()
    local = cfg.num_experts // ep
    errors = {}
    for name, p in model.named_parameters():
        ref = dict(reference.named_parameters())[name].grad
        if p.shape != ref.shape:  # an expert shard
            ref = ref[groups.ep_rank * local:(groups.ep_rank + 1) * local]
        errors[name] = float((p.grad - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    grouped = all(r.balance_group is not None for r in model.modules() if isinstance(r, TopKRouter))
    return {"errors": errors, "grouped": grouped}


@pytest.mark.parametrize("dp,ep", [(2, 1), (1, 2)])
def test_a_whole_model_with_global_balance_over_dp_x_ep_ranks_has_one_process_gradients(dp, ep):
    results = run_ranks(2, _qwen3_global, dp, ep, "global_aux_loss")
    for res in results:
        assert res["grouped"]  # parallelize handed every router its group
        # float32 sums in another order over ranks: 1e-5 relative of each tensor's largest entry
        assert max(res["errors"].values()) < 1e-5, sorted(res["errors"].items(), key=lambda kv: -kv[1])[:3]
    local = run_ranks(2, _qwen3_global, dp, ep, "aux_loss")  # each rank's own micro-batch loss: other gradients
    assert max(v for k, v in local[0]["errors"].items() if k.endswith("gate.weight")) > 1e-3

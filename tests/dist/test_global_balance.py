"""The global-batch balance loss (balance_mode=global_aux_loss): ranks that each route half of a
micro-batch, their expert counts summed before the loss is applied, give (as the data-parallel mean
of their losses and gradients) exactly the loss and router gradient of one process routing the whole
micro-batch; the micro-batch loss (aux_loss) does not. And the router z-loss."""
import dataclasses

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

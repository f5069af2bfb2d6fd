"""GRPO's pieces (moetron.rl): group advantages, the clipped objective and the KL estimate, and
routing replay, which makes an MoE policy's first importance ratio exactly 1 where a router that
chooses again (here: a changed routing bias, as after a bias update) does not."""
import pytest
import torch

from moetron.models import build_model, load_preset
from moetron.models.common.packed import PackedSamples
from moetron.models.generate import generate
from moetron.rl.grpo import group_advantages, grpo_loss, token_logprobs
from moetron.rl.replay import recording, replaying


def test_advantages_are_rewards_against_their_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # nothing to prefer within the group


def test_the_clip_bounds_the_ratio_on_the_side_the_advantage_favours():
    logp_old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_()
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 4)
    terms = grpo_loss(logp, logp_old, adv, mask, clip_eps=0.2, denominator=4.0)
    # objectives: min(1.5, 1.2) = 1.2, min(0.5, 0.8) = 0.5, 1.2, 0.5 -> loss -(3.4) / 4
    assert float(terms.loss) == pytest.approx(-3.4 / 4)
    terms.loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0  # the clipped token gives no gradient
    assert float(terms.clipped) == 2 and float(terms.ratio) == pytest.approx(4.0)
    worse = grpo_loss(logp.detach(), logp_old, -adv, mask, clip_eps=0.2, denominator=4.0)
    # negative advantage: min(-1.5, -1.2) = -1.5 (no clip above), min(-0.5, -0.8) = -0.8
    assert float(worse.loss) == pytest.approx((1.5 + 0.8) * 2 / 4)


def test_the_kl_term_and_its_gradient_vanish_when_the_policy_is_the_reference():
    logp = torch.log_softmax(torch.randn(2, 5), dim=-1).requires_grad_()
    terms = grpo_loss(logp, logp.detach(), torch.zeros(2), torch.ones(2, 5), 0.2, 10.0, beta=0.04,
                      logp_ref_BT=logp.detach())
    assert float(terms.kl) == 0.0
    terms.loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    apart = grpo_loss(logp.detach(), logp.detach(), torch.zeros(2), torch.ones(2, 5), 0.2, 10.0, beta=0.04,
                      logp_ref_BT=logp.detach() - 0.3)
    assert float(apart.kl) > 0


def _ratios(model, prompts, completions, logp_old, routes=None):
    """pi / pi_old of each completion token, from a training-style forward over prompt + completion."""
    L = max(len(p) for p in prompts)
    rows = [[0] * (L - len(p)) + p + c for p, c in zip(prompts, completions)]
    full = torch.tensor(rows)
    valid = torch.tensor([[False] * (L - len(p)) + [True] * (len(p) + len(c)) for p, c in zip(prompts, completions)])
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    inputs = full[:, :-1]
    with torch.no_grad(), (replaying(model, routes) if routes is not None else torch.enable_grad()):
        logits = model(inputs, samples=PackedSamples(positions[:, :-1], valid[:, :-1]))
    T = len(completions[0])
    logp = token_logprobs(logits[:, L - 1:], full[:, L:])
    assert logp.shape == (len(prompts), T)
    return torch.exp(logp - torch.tensor(logp_old))


@pytest.mark.parametrize("preset", ["tiny", "mixtral_tiny"])
def test_with_routing_replay_the_first_ratio_is_one(preset):
    torch.manual_seed(0)
    model = build_model(load_preset(preset)).eval()
    prompts = [[5, 17, 99, 3, 42], [7, 8, 9], [300, 2, 1, 4]]
    with recording(model) as routes:
        completions, logp_old = generate(model, prompts, 6, temperature=1.0,
                                         generator=torch.Generator().manual_seed(0), return_logprobs=True)
    assert routes and all(r.shape[:2] == (3, 5 + 6 - 1) for r in routes.values())
    with torch.no_grad():  # the router now chooses otherwise (a bias update, or another engine's numerics)
        for name, module in model.named_modules():
            if name.endswith("mlp.gate"):
                if preset == "tiny":
                    module.expert_bias.normal_(0.0, 1.0)
                else:
                    module.weight.add_(0.2 * torch.randn_like(module.weight))
    replayed = _ratios(model, prompts, completions, logp_old, routes)
    if preset == "tiny":  # the bias only chooses: with the same experts the policy is the same
        assert float((replayed - 1).abs().max()) < 1e-5
    chosen_again = _ratios(model, prompts, completions, logp_old)
    assert float((chosen_again - 1).abs().max()) > 1e-3
    assert float((chosen_again - 1).abs().max()) > float((replayed - 1).abs().max())


def test_replayed_routes_give_the_sampled_log_probabilities():
    torch.manual_seed(1)
    model = build_model(load_preset("tiny")).eval()
    prompts = [[11, 12, 13], [40, 41, 42, 43, 44]]
    with recording(model) as routes:
        completions, logp_old = generate(model, prompts, 5, return_logprobs=True)
    ratios = _ratios(model, prompts, completions, logp_old, routes)
    assert float((ratios - 1).abs().max()) < 1e-6  # float32: the cache and the full forward sum alike to 1e-6

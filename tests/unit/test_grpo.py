"""GRPO's pieces (moetron.rl): group advantages, the clipped objective and the KL estimate, and
routing replay, which makes an MoE policy's first importance ratio exactly 1 where a router that
chooses again (here: a changed routing bias, as after a bias update) does not."""
from contextlib import nullcontext

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


def _ratios(model, prompts, completions, logp_old, routes=None, temperature=1.0):
    """pi / pi_old of each completion token, from a training-style forward over prompt + completion."""
    L = max(len(p) for p in prompts)
    rows = [[0] * (L - len(p)) + p + c for p, c in zip(prompts, completions)]
    full = torch.tensor(rows)
    valid = torch.tensor([[False] * (L - len(p)) + [True] * (len(p) + len(c)) for p, c in zip(prompts, completions)])
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    inputs = full[:, :-1]
    with torch.no_grad(), (replaying(model, routes) if routes is not None else nullcontext()):
        logits = model(inputs, samples=PackedSamples(positions[:, :-1], valid[:, :-1]))
    T = len(completions[0])
    logp = token_logprobs(logits[:, L - 1:], full[:, L:], temperature)
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


def test_the_cached_sampler_and_the_replayed_training_forward_give_the_same_log_probabilities():
    """At a temperature other than 1, both sides are the softmax of logits / temperature."""
    torch.manual_seed(1)
    model = build_model(load_preset("tiny")).eval()
    prompts = [[11, 12, 13], [40, 41, 42, 43, 44]]
    with recording(model) as routes:
        completions, logp_old = generate(model, prompts, 5, temperature=0.7, return_logprobs=True,
                                         generator=torch.Generator().manual_seed(3))
    ratios = _ratios(model, prompts, completions, logp_old, routes, temperature=0.7)
    assert float((ratios - 1).abs().max()) < 1e-6  # float32: the cache and the full forward sum alike to 1e-6
    at_one = _ratios(model, prompts, completions, logp_old, routes, temperature=1.0)
    assert float((at_one - 1).abs().max()) > 1e-3  # another distribution than the one sampled


def test_a_rollout_scores_groups_and_replays_to_the_sampled_policy():
    from moetron.data.tokenizers import ByteTokenizer
    from moetron.rl.grpo import grpo_loss
    from moetron.rl.rollout import RolloutSettings, policy_logprobs, rollout
    from moetron.rl.task import exact_answer, sums

    torch.manual_seed(2)
    model = build_model(load_preset("tiny"))
    examples = sums(3, seed=1)
    settings = RolloutSettings(group_size=4, max_new_tokens=7)
    batch = rollout(model, ByteTokenizer(), examples, settings, {"exact_answer": exact_answer},
                    torch.Generator().manual_seed(0))
    length = lambda prompts, completions, **f: [float(len(c)) for c in completions]  # noqa: E731
    half = lambda prompts, completions, **f: [0.5] * len(completions)  # noqa: E731
    by_length = rollout(model, ByteTokenizer(), examples, settings,  # a reward that varies within groups
                        {"length": length, "half": half}, torch.Generator().manual_seed(0))
    assert torch.equal(by_length.rewards_B, by_length.reward_parts["length"] + 0.5)  # the sum of the parts
    assert float(by_length.reward_parts["length"].sum()) > 0  # both parts count
    rewards = by_length.rewards_B.view(3, 4)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, unbiased=False, keepdim=True) + 1e-6)
    assert torch.allclose(by_length.advantages_B, expected.flatten()) and by_length.advantages_B.abs().sum() > 0
    assert batch.inputs_BS.shape[0] == 12 and len(batch.completions) == 12
    counted = batch.targets_BS.sum(1)
    assert int(counted.min()) >= 1 and int(counted.max()) == 7  # each completion's tokens, up to max_new_tokens
    assert torch.equal(counted, (batch.logp_old_BS != 0).sum(1))  # a sampled log-probability on each
    assert torch.equal(batch.rewards_B, torch.zeros(12))  # an untrained model: no sum right
    assert torch.equal(batch.advantages_B, torch.zeros(12))
    logp = policy_logprobs(model, batch)
    ratio = torch.exp(logp - batch.logp_old_BS)[batch.targets_BS]
    assert float((ratio - 1).abs().max()) < 1e-5
    model.train()
    fake_adv = torch.linspace(-1, 1, 12)  # some signal, to see gradients reach the router's gates
    terms = grpo_loss(policy_logprobs(model, batch), batch.logp_old_BS, fake_adv, batch.targets_BS, 0.2,
                      float(batch.targets_BS.sum()))
    terms.loss.backward()
    router = model.layers[1].mlp.gate
    assert router.weight.grad is not None and float(router.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("fn,says", [
    (lambda p, c, **f: 1 / 0, "raised ZeroDivisionError"),
    (lambda p, c, **f: [1.0], "returned 1 rewards for 2 completions"),
    (lambda p, c, **f: [1.0, float("nan")], "reward nan for completion 1"),
    (lambda p, c, **f: None, "returned NoneType that is not a list of numbers"),
])
def test_a_reward_function_that_fails_is_named(fn, says):
    from moetron.rl.rewards import RewardError, load_reward, score

    with pytest.raises(RewardError, match=f"rl.reward=mine: {says}"):
        score(fn, "mine", ["a", "b"], ["x", "y"], {})
    assert load_reward("moetron.rl.task:exact_answer")(["q"], ["1 + 2 = 3."], answer=["3"]) == [1.0]
    with pytest.raises(RewardError, match="has no function 'nope'"):
        load_reward("moetron.rl.task:nope")

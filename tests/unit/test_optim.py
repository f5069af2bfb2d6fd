"""The BF16-moment AdamW: foreach ops in chunks give what a loop over parameters gives, bit for
bit, with per-parameter step counts (a parameter without a gradient on some steps) and across a
save and load."""
import torch

from moetron.train.optim import AdamWLowPrecisionMoments


class _Loop(torch.optim.Optimizer):
    """The reference: the per-parameter loop the foreach version replaced."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = state["step"]
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                denom = (exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((exp_avg / (1 - beta1 ** t) / denom).to(p.dtype), alpha=-group["lr"])


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(7, 5), (3,), (100, 64), (33,)]]


def test_foreach_chunks_equal_the_loop_with_uneven_steps_and_a_reload():
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref, ours = _params(0), _params(0)
    loop, fast = _Loop(ref, **kw), AdamWLowPrecisionMoments(ours, chunk_elems=40, **kw)  # several chunks
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        for i, (a, b) in enumerate(zip(ref, ours, strict=True)):
            if i == 3 and step in (0, 1, 4):  # no gradient on these steps: its own step count lags
                a.grad = b.grad = None
                continue
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        loop.step()
        fast.step()
        if step == 2:  # save and load mid-way
            reloaded = AdamWLowPrecisionMoments(ours, chunk_elems=40, **kw)
            reloaded.load_state_dict(fast.state_dict())
            fast = reloaded
    assert all(torch.equal(a, b) for a, b in zip(ref, ours, strict=True))
    assert [int(fast.state[p]["step"]) for p in ours] == [6, 6, 6, 3]
    assert all(fast.state[p]["exp_avg"].dtype == torch.bfloat16 for p in ours)
    assert all(torch.equal(loop.state[a]["exp_avg_sq"], fast.state[b]["exp_avg_sq"])
               for a, b in zip(ref, ours, strict=True))

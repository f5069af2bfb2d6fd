"""The optimizer: AdamW (torch fused where the device allows, BF16 moments as an option, NVIDIA
apex's FusedAdam only if installed). The learning rate: moetron.train.lr_schedule."""
from __future__ import annotations

import torch


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW whose moments are stored in `moments_dtype` (BF16 in DeepSeek-V3, report section 3.3)
    and updated in float32; parameters (the FP32 master weights) are updated in their own dtype."""

    def __init__(self, params, lr, betas, eps, weight_decay, moments_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments_dtype = moments_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                state["step"] += 1
                t = state["step"].item()
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                denom = (exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((exp_avg / (1 - beta1 ** t) / denom).to(p.dtype), alpha=-group["lr"])


def build_optimizer(groups: list[dict], cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `groups` (`StepFinalizer.optimizer_param_groups`: the held parameters, or their
    ZeRO-1 master shards, with weight decay on matrices only)."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.moments_dtype == "bfloat16":
        return AdamWLowPrecisionMoments(groups, moments_dtype=torch.bfloat16, weight_decay=cfg.weight_decay, **kwargs)
    if cfg.implementation == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as err:
            raise ImportError("optim.implementation=apex needs NVIDIA apex built from source (see README); "
                              "the PyPI package named apex is unrelated. Or use optim.implementation=auto") from err
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    fused = cfg.implementation == "auto" and device.type == "cuda"
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def optimizer_state_gib(optimizer: torch.optim.Optimizer) -> float:
    """This rank's optimizer state and the master weights it steps on (the parameters, or their
    ZeRO-1 shards), in GiB."""
    tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += [p for group in optimizer.param_groups for p in group["params"]]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30

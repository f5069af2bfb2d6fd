"""The optimizer: AdamW (torch fused where the device allows, BF16 moments as an option, NVIDIA
apex's FusedAdam only if installed). The learning rate: moetron.train.lr_schedule."""
from __future__ import annotations

import torch
from torch import nn

from moetron.parallel.materialize import held_parameters


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW whose moments are stored in `moments_dtype` (BF16 in DeepSeek-V3, report section 3.3)
    and updated in float32; parameters (the FP32 master weights) are updated in their own dtype.

    Foreach ops over chunks of `chunk_elems` elements (their float32 temporaries stay bounded), and
    no host sync per step: each parameter's `step` is a CPU tensor (as in torch's AdamW, for
    checkpoints), counted without being read; the bias corrections use a host-side copy of each
    parameter's count, read from the state once after a load."""

    def __init__(self, params, lr, betas, eps, weight_decay, moments_dtype=torch.bfloat16, chunk_elems=1 << 26):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments_dtype, self.chunk_elems = moments_dtype, chunk_elems
        self._steps: dict[int, int] = {}  # steps taken per parameter (id), mirrored on the host

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._steps.clear()  # read again from the loaded steps
        for state in self.state.values():  # torch's loader casts state to the parameter's dtype
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moments_dtype)

    def _chunks(self, params: list):
        chunk, size = [], 0
        for p in params:
            chunk.append(p)
            size += p.numel()
            if size >= self.chunk_elems:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            by_step: dict[int, list] = {}  # parameters at the same step share bias corrections
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                if id(p) not in self._steps:  # after a load (or the first step): one read, on the host
                    self._steps[id(p)] = int(state["step"])
                self._steps[id(p)] += 1
                by_step.setdefault(self._steps[id(p)], []).append(p)
            if params:
                torch._foreach_add_([self.state[p]["step"] for p in params], 1.0)
            beta1, beta2 = group["betas"]
            for t, same in by_step.items():
                for chunk in self._chunks(same):
                    self._update(chunk, group, t, beta1, beta2)

    def _update(self, params: list, group: dict, t: int, beta1: float, beta2: float) -> None:
        """One chunk, the same float32 arithmetic per element as a loop over parameters would do."""
        states = [self.state[p] for p in params]
        grads = [p.grad.float() for p in params]
        exp_avg = [s["exp_avg"].float() for s in states]
        exp_avg_sq = [s["exp_avg_sq"].float() for s in states]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        torch._foreach_copy_([s["exp_avg"] for s in states], exp_avg)
        torch._foreach_copy_([s["exp_avg_sq"] for s in states], exp_avg_sq)
        denom = torch._foreach_div(exp_avg_sq, 1 - beta2 ** t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        update = torch._foreach_div(exp_avg, 1 - beta1 ** t)
        torch._foreach_div_(update, denom)
        torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(update, params)], alpha=-group["lr"])


def param_groups(model: nn.Module, weight_decay: float, stepped_on=lambda p: p) -> list[dict]:
    """What the optimizer steps on, in model order: the held parameters, or what `stepped_on(p)`
    gives for each (under ZeRO-1 its master shard: `StepFinalizer.stepped_on`). Weight decay on
    matrices and expert stacks, none on norms and vectors."""
    held = [p for p in held_parameters(model) if p.requires_grad]
    decay = [stepped_on(p) for p in held if p.ndim >= 2]
    no_decay = [stepped_on(p) for p in held if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `groups` (`param_groups`: the held parameters, or their ZeRO-1 master shards,
    with weight decay on matrices only)."""
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
    # fused: one kernel per step on CUDA and on the CPU (torch 2.4+), and no host sync reading steps
    return torch.optim.AdamW(groups, fused=(cfg.implementation == "auto") or None, **kwargs)


def optimizer_state_gib(optimizer: torch.optim.Optimizer) -> float:
    """This rank's optimizer state and the master weights it steps on (the parameters, or their
    ZeRO-1 shards), in GiB."""
    tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += [p for group in optimizer.param_groups for p in group["params"]]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30

"""What a language model's loss is made of, returned as values (never kept on modules).

Every architecture reports the same four terms, so the trainer and the pipeline add them up without
knowing the model: the total (what is back-propagated), the next-token loss, an extra prediction
loss (DeepSeek-V3's MTP; 0 without) and a balance loss (MoE routing; 0 without). A pipeline stage
that holds MoE layers but not the loss reports its balance loss alone (`LossTerms.logged`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

LOSS_TERMS = ("loss", "lm", "mtp", "balance")  # the entries of LossTerms.logged(), in order


def named_losses(values: torch.Tensor, names: dict[str, str], prefix: str = "") -> dict[str, float]:
    """The reported entries of a `LOSS_TERMS`-ordered vector under their metric names (a spec's
    `loss_metrics`), each name prefixed."""
    return {prefix + names[term]: float(v) for term, v in zip(LOSS_TERMS, values.tolist()) if term in names}


def add_optional(total: Optional[torch.Tensor], term: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """total + term, where either may be None (absent)."""
    if term is None:
        return total
    return term if total is None else total + term


def _f64(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64, device=like.device) if t is None else t.detach().double()


@dataclass
class LossTerms:
    lm: Optional[torch.Tensor]  # next-token cross entropy (None on a stage without the head)
    mtp: Optional[torch.Tensor] = None  # weighted multi-token prediction loss
    balance: Optional[torch.Tensor] = None  # alpha-weighted balance losses
    logits_BSV: Optional[torch.Tensor] = None  # the head's output, where the loss computed it

    @property
    def total(self) -> torch.Tensor:
        return add_optional(add_optional(self.lm, self.mtp), self.balance)

    def logged(self) -> torch.Tensor:
        """[total, lm, mtp, balance] as a detached float64 vector, on the device (no host sync)."""
        total = self.total
        return torch.stack([_f64(t, total) for t in (total, self.lm, self.mtp, self.balance)])


@dataclass
class LMOutput:
    loss: torch.Tensor  # what to back-propagate: LM + MTP + balance
    loss_lm: torch.Tensor  # next-token cross entropy
    loss_mtp: Optional[torch.Tensor]  # (lambda / D) * sum_k L^k, None without MTP
    loss_balance: Optional[torch.Tensor]  # sum of the layers' alpha-weighted balance losses
    logits_BSV: Optional[torch.Tensor]  # None under memory.chunked_loss (never whole)

    def logged(self) -> torch.Tensor:
        return LossTerms(self.loss_lm, self.loss_mtp, self.loss_balance).logged()

"""Forward and backward of one GRPO optimizer step over this rank's rollout (pp = 1): the rollout's
completions in micro-batches of `train.micro_batch`, each one's policy log-probabilities (routes
replayed) into the GRPO loss (moetron.rl.grpo), backward; the step finalizer told when the last
backward starts, as for token data (moetron.train.micro_batches)."""
from __future__ import annotations

import torch

from moetron.rl.grpo import grpo_loss
from moetron.rl.rollout import Rollout, policy_logprobs
from moetron.train.micro_batches import LocalMicroBatches

# the summed terms of a step, in this order (float64): what the loop logs
GRPO_SUMS = ("loss", "kl", "clipped", "ratio", "tokens", "entropy")


def micro_rows(batch: Rollout, micro_batch: int) -> list[slice]:
    """The rows of each micro-batch of `batch` (its completions, `micro_batch` at a time)."""
    B = batch.inputs_BS.shape[0]
    return [slice(first, first + micro_batch) for first in range(0, B, micro_batch)]


class GRPOMicroBatches(LocalMicroBatches):
    def autocast(self):
        """The compute dtype's autocast (the sampler runs under it too: its log-probabilities are
        those the training forward reproduces)."""
        return self._autocast()

    def weights_changed(self) -> None:
        """Before sampling: caches made of the weights before the last optimizer step are stale."""
        self._new_weights([self.model])

    def run_rollout(self, batch: Rollout, micro_batch: int, denominator: float, clip_eps: float,
                    beta: float) -> torch.Tensor:
        """The GRPO loss's backward over `batch`; returns the summed GRPO_SUMS. `denominator`: the
        global batch's completion tokens / (micro-batches x data ranks), so that the mean over both
        that the gradients get is the global sum over the global tokens (moetron.rl.grpo)."""
        sums = torch.zeros(len(GRPO_SUMS), dtype=torch.float64, device=self.device)
        self._new_weights([self.model])
        rows = micro_rows(batch, micro_batch)
        for i, part in enumerate(rows):
            with self._autocast(), self.meter.saving(i):
                logp_BS, entropy_BS = policy_logprobs(self.model, batch, part, with_entropy=True)
            logp_ref_BS = None if batch.logp_ref_BS is None else batch.logp_ref_BS[part]
            terms = grpo_loss(logp_BS, batch.logp_old_BS[part], batch.advantages_B[part], batch.targets_BS[part],
                              clip_eps, denominator, beta, logp_ref_BS)
            self.meter.sample()
            self._backward(terms.loss / len(rows), last=i == len(rows) - 1)
            sums += torch.stack([terms.loss.detach(), terms.kl * denominator, terms.clipped, terms.ratio,
                                 terms.tokens, entropy_BS.sum()]).double()
        return sums

    @torch.no_grad()
    def reference_logprobs(self, batch: Rollout, micro_batch: int, reference) -> torch.Tensor:
        """[B, S] the reference model's log-probabilities of the labels (`reference`: the frozen
        weights, swapped in for these forwards), routes replayed as in training."""
        self._new_weights([self.model])
        parts = []
        self.model.eval()  # the routers count no load for these forwards
        try:
            with reference.swapped_in(), self._autocast():
                for part in micro_rows(batch, micro_batch):
                    parts.append(policy_logprobs(self.model, batch, part).float())
        finally:
            self.model.train()
        self._new_weights([self.model])  # caches of the reference's weights are stale now
        return torch.cat(parts)

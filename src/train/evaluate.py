"""Validation loss: the model's loss on fixed batches of the validation data, forward only, in
every layout (a pipeline runs its schedule's forwards), reduced like the training loss."""
from __future__ import annotations

from moetron.comm.packed import all_reduce_packed
from moetron.models.outputs import named_losses
from moetron.data.windows import BatchSampler, Blend


def evaluate(micro, world_size: int, valid: Blend, loss_options, loss_names: dict, tcfg, data_rank: int,
             dims) -> dict[str, float]:
    """`eval/<loss name>` (eval/loss, eval/loss/lm, ...) over `train.eval_batches` global batches:
    the validation data's first samples, the same every time (chat data: its assistant tokens).
    `loss_options(sampler, first, batch, loss_count)`: the model's loss options for a batch. Every
    rank calls it at the same step; `data_rank`: mine among the dims' data ranks (ParallelDims)."""
    sampler = BatchSampler(valid)
    total = None
    for batch in range(tcfg.eval_batches):
        first = batch * tcfg.global_batch
        micro_batches = list(sampler.micro_batches(first, tcfg.global_batch, tcfg.micro_batch, data_rank,
                                                   dims.data_ranks))
        part = micro.evaluate(micro_batches, loss_options(sampler, first, tcfg.global_batch,
                                                          len(micro_batches) * dims.stage_ranks))
        total = part if total is None else total + part
    summed = all_reduce_packed({"eval": total}, world_size=world_size)["eval"]
    losses = summed / (len(micro_batches) * dims.stage_ranks * tcfg.eval_batches)
    names = {term: name for term, name in loss_names.items() if term != "balance"}  # no balance loss in eval
    return named_losses(losses, names, prefix="eval/")

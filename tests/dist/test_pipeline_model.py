"""The tiny DeepSeek-V3 (MoE layers, balance losses, MTP) cut into pipeline stages and run by each
schedule on gloo ranks, against the whole model in one process on the same micro-batches."""
import pytest
import torch
import torch.distributed as dist

from moetron.models.deepseek_v3 import DeepSeekV3, load_preset
from moetron.models.deepseek_v3.stages import build_stages, even_layout
from moetron.pipeline.builders import BUILDERS, build_schedule
from moetron.pipeline.runtime import PipelineRunner
from tests.dist.harness import run_ranks

ROWS, SEQ, LAYERS = 2, 16, 8  # 8 layers: one per stage of the 2 x 4 stages of DualPipeV / interleaved at PP4


def _model():
    torch.manual_seed(0)
    return DeepSeekV3(load_preset("tiny", num_hidden_layers=LAYERS)).train()


def _micro_batches(n, vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (n, ROWS, SEQ + 1), generator=g)
    return {mb: ids[mb, :, :-1] for mb in range(n)}, {mb: (ids[mb, :, :-1], ids[mb, :, 1:]) for mb in range(n)}


def _reference(n):
    model = _model()
    inputs, targets = _micro_batches(n, model.cfg.vocab_size)
    losses = {}
    for mb in range(n):
        out = model(*targets[mb])
        (out.loss / n).backward()
        losses[mb] = (out.loss_lm + out.loss_mtp).detach()
    return losses, {name: p.grad for name, p in model.named_parameters()}


def _depth(name, P, stage):
    return stage % P if name == "dualpipe" else stage


def _pipeline(rank, world, name, n):
    sched = build_schedule(name, world, n)
    model = _model()
    stages, tail = build_stages(model, even_layout(LAYERS, len(sched.chains[0])), aux_scale=1.0 / n)
    mine = {s: stages[_depth(name, world, s)] for s, r in sched.stage_rank.items() if r == rank}
    runner = PipelineRunner(sched, rank, mine, dist.group.WORLD, (ROWS, SEQ, model.cfg.hidden_size))
    inputs, targets = _micro_batches(n, model.cfg.vocab_size)
    losses = runner.step(inputs, targets, tail, loss_scale=1.0 / n)
    return losses, {name_: p.grad for name_, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("extra", [0, 1], ids=["minimum", "more"])
def test_model_pipeline_matches_single_process(name, pp, extra):
    n = (2 * pp if name in ("dualpipe", "dualpipev") else pp) + extra * 2 * pp
    ref_losses, ref_grads = _reference(n)
    results = run_ranks(pp, _pipeline, name, n)
    losses, grads = {}, {}
    for rank_losses, rank_grads in results:
        losses.update(rank_losses)
        for key, g in rank_grads.items():  # copies on several ranks (mirrors, MTP's embedding) add up
            grads[key] = g if key not in grads else grads[key] + g
    for mb in range(n):
        # float32, same ops; 1e-6 relative (the embedding's copies add in another order)
        assert float((losses[mb] - ref_losses[mb]).abs() / ref_losses[mb].abs()) < 1e-6
    assert grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        assert float((grads[key] - ref).abs().max() / ref.abs().max()) < 1e-5, key  # gradients: 1e-5 relative

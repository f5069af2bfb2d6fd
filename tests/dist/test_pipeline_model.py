"""The tiny DeepSeek-V3 (MoE layers, balance losses, MTP) cut into pipeline stages and run by each
schedule on gloo ranks, against the whole model in one process on the same micro-batches."""
import functools

import pytest
import torch
import torch.distributed as dist

from moetron.models import get_spec
from moetron.models.deepseek_v3 import DeepSeekV3, load_preset
from moetron.pipeline.builders import BUILDERS, build_schedule
from moetron.pipeline.runtime import PipelineRunner
from tests.dist.harness import run_ranks

ROWS, SEQ, LAYERS = 2, 16, 8  # 8 layers: one per stage of the 2 x 4 stages of DualPipeV / interleaved at PP4
MTP_WEIGHT = 0.2  # not the config's 0.3: the weight travels as an argument


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
    logged = torch.zeros(4, dtype=torch.float64)
    for mb in range(n):
        out = model(*targets[mb], mtp_weight=MTP_WEIGHT)
        (out.loss / n).backward()
        logged += out.logged()
    return logged, {name: p.grad for name, p in model.named_parameters()}


def _pipeline(rank, world, name, n):
    sched = build_schedule(name, world, n)
    model = _model()
    spec = get_spec("deepseek_v3")
    made = spec.parallelize(model, None, "alltoall", defer_weights=True)  # no EP: groups are not read
    parts = spec.pipeline_split(model, sched, rank, None, n)
    runner = PipelineRunner(sched, rank, parts.stage_modules, dist.group.WORLD, (ROWS, SEQ, model.cfg.hidden_size),
                            store=made.weight_grad_store)
    inputs, targets = _micro_batches(n, model.cfg.vocab_size)
    loss_fn = functools.partial(parts.tail, mtp_weight=MTP_WEIGHT) if parts.tail is not None else None
    deferred = []  # weight gradients B actions queued for W actions, through the store parallelize made
    put = made.weight_grad_store.put
    made.weight_grad_store.put = lambda fn: deferred.append(1) or put(fn)
    result = runner.step(inputs, targets, loss_fn, loss_scale=1.0 / n)
    splits = any(a.kind == "B" for a in sched.actions[rank])
    assert (len(deferred) > 0) == splits, (name, rank, len(deferred))
    return result.metrics, {name_: p.grad for name_, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("extra", [0, 1], ids=["minimum", "more"])
def test_model_pipeline_matches_single_process(name, pp, extra):
    n = (2 * pp if name in ("dualpipe", "dualpipev") else pp) + extra * 2 * pp
    ref_logged, ref_grads = _reference(n)
    results = run_ranks(pp, _pipeline, name, n)
    logged, grads = torch.zeros(4, dtype=torch.float64), {}
    for rank_logged, rank_grads in results:
        if rank_logged is not None:  # loss terms come back as values: each rank its stages' part
            logged += rank_logged
        for key, g in rank_grads.items():  # copies on several ranks (mirrors, MTP's embedding) add up
            grads[key] = g if key not in grads else grads[key] + g
    # float32 terms, summed in float64 in another order: 1e-6 relative
    torch.testing.assert_close(logged, ref_logged, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        assert float((grads[key] - ref).abs().max() / ref.abs().max()) < 1e-5, key  # gradients: 1e-5 relative

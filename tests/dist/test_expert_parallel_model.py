"""The whole tiny DeepSeek-V3 (MoE layers and the MTP block) under expert parallelism against one
process on the same sequences: every gradient after reduction, and the routing biases after an update."""
import copy

import pytest
import torch

from moetron.models.deepseek_v3 import finish_moe_step, load_preset
from moetron.models.deepseek_v3.model import DeepSeekV3
from moetron.models.common.parallelize import parallelize
from moetron.parallel.dims import ParallelDims, Topology, build_groups
from moetron.parallel.finalize import StepFinalizer
from tests.dist.harness import run_ranks

SEQS_PER_RANK, SEQ = 2, 32


def rel_error(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def model_ep(rank, world, dp, ep, nodes, dispatcher):
    torch.manual_seed(0)
    cfg = load_preset("tiny", n_routed_experts=8, n_group=nodes, topk_group=1,
                      bias_update_speed=0.01)
    reference = DeepSeekV3(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (world * SEQS_PER_RANK, SEQ + 1))
    model = copy.deepcopy(reference)
    groups = build_groups(ParallelDims(pp=1, dp=dp, ep=ep), Topology(nodes, world // nodes), rank)
    made = parallelize(model, groups, dispatcher)
    finalizer = StepFinalizer(model, made.expert_params, groups, grad_clip=0.0)  # the gradient buffers

    reference(ids[:, :-1], ids[:, 1:]).loss.backward()
    mine = ids[rank * SEQS_PER_RANK:(rank + 1) * SEQS_PER_RANK]
    model(mine[:, :-1], mine[:, 1:]).loss.backward()
    finalizer.finish_gradients()  # averaged over dp x ep, experts over expert-DP

    ref_params = dict(reference.named_parameters())
    local = cfg.n_routed_experts // ep
    pairs = {}
    for name, p in model.named_parameters():
        ref_grad = ref_params[name].grad
        if p.shape != ref_params[name].shape:  # an expert shard
            ref_grad = ref_grad[groups.ep_rank * local:(groups.ep_rank + 1) * local]
        pairs[name] = (p.grad, ref_grad)
    finish_moe_step(reference)
    finish_moe_step(model, group=groups.dp_ep_group)
    biases = {n: (b, dict(reference.named_buffers())[n]) for n, b in model.named_buffers() if n.endswith("expert_bias")}
    return {"grads": pairs, "biases": biases}


@pytest.mark.parametrize("dp,ep,nodes,dispatcher", [(1, 4, 1, "alltoall"), (2, 2, 1, "hierarchical"),
                                                    (1, 4, 2, "hierarchical"), (2, 4, 2, "hierarchical")])
def test_whole_model_under_expert_parallelism(dp, ep, nodes, dispatcher):
    results = run_ranks(dp * ep, model_ep, dp, ep, nodes, dispatcher)
    for rank, res in enumerate(results):
        assert len(res["grads"]) == len(list(DeepSeekV3(load_preset("tiny")).parameters()))
        for name, (grad, ref) in res["grads"].items():
            # float32; per-rank partial sums reduced across ranks: 1e-5 relative
            assert rel_error(grad, ref) < 1e-5, f"rank {rank}: {name}"
        for name, (bias, ref) in res["biases"].items():
            assert torch.equal(bias, ref), f"rank {rank}: {name}"  # loads are integers: exact
            assert torch.equal(bias, results[0]["biases"][name][0])
            assert bias.abs().sum() > 0

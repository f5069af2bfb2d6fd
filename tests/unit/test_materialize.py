"""Meta-device build + per-rank materialisation: each pipeline rank allocates only its stages, each
EP rank only its experts, and what they hold equals the whole model initialised in one process."""
import pytest
import torch

from moetron.models import build_model, load_preset
from moetron.models.common.parallelize import parallelize
from moetron.parallel.dims import ParallelDims, ParallelGroups, Topology
from moetron.parallel.materialize import held_state_dict, load_held_state_dict, materialize
from moetron.models.stages import pipeline_split
from moetron.pipeline.builders import build_schedule

SEED = 1234


def _groups(pp, ep, rank):
    dims = ParallelDims(pp=pp, dp=1, ep=ep)
    return ParallelGroups(dims, Topology(1, pp * ep), rank, None, None, None, None, None)


def _whole(cfg, seed=SEED):
    model = build_model(cfg, device="meta")
    return materialize(model, [model], torch.device("cpu"), seed)


@pytest.mark.parametrize("schedule,pp,ep", [("dualpipev", 2, 1), ("1f1b", 2, 2), ("dualpipe", 2, 1)])
def test_each_rank_holds_only_its_part_initialised_as_the_whole_model(schedule, pp, ep):
    cfg = load_preset("tiny", num_hidden_layers=4, n_routed_experts=8)
    whole = held_state_dict(_whole(cfg))
    sched = build_schedule(schedule, pp, 2 * pp)
    seen = set()
    for rank in range(pp * ep):
        groups = _groups(pp, ep, rank)
        model = build_model(cfg, device="meta")
        made = parallelize(model, groups, "alltoall", defer_weights=True)
        parts = pipeline_split(model, sched, groups.pp_rank, None, 2 * pp)
        ids = {id(p) for p in model.parameters()}
        materialize(model, parts.held_modules, torch.device("cpu"), SEED)
        # parameters keep their identity: what parallelize and the split recorded stays true
        assert ids == {id(p) for p in model.parameters()}
        held_ids = {id(p) for m in parts.held_modules for p in m.parameters()}
        assert all(not p.is_meta for p in made.expert_params if id(p) in held_ids)
        moe_layers = cfg.num_moe_layers + cfg.num_nextn_predict_layers  # the MTP block is a MoE layer too
        assert len(made.expert_params) == (0 if ep == 1 else 2 * moe_layers)  # gate_up_proj and down_proj each
        mine = held_state_dict(model)
        if schedule != "dualpipe":  # DualPipe mirrors: every rank holds every stage once
            assert len(mine) < len(whole)
        local = cfg.n_routed_experts // ep
        for name, tensor in mine.items():
            ref = whole[name]
            if tensor.shape != ref.shape:  # an expert shard: rows of this EP rank's experts
                ep_rank = groups.ep_rank
                ref = ref[ep_rank * local:(ep_rank + 1) * local]
            assert torch.equal(tensor, ref), name
        seen |= mine.keys()
        assert all(p.is_meta for n, p in model.named_parameters() if n not in mine)
    assert seen == set(whole)  # together the ranks hold the whole model


def test_held_state_dict_round_trip_and_missing_entries():
    cfg = load_preset("tiny", num_hidden_layers=2)
    source = _whole(cfg)
    target = _whole(cfg, seed=SEED + 1)
    load_held_state_dict(target, held_state_dict(source))
    pairs = zip(source.state_dict().values(), target.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    partial = dict(held_state_dict(source))
    partial.pop("norm.weight")
    with pytest.raises(KeyError, match="another parallel layout"):
        load_held_state_dict(target, partial)


def test_merging_shards_places_experts_and_refuses_gaps():
    from moetron.parallel.materialize import merge_shards

    shapes = {"experts": (4, 2), "norm": (2,)}
    whole = torch.arange(8.0).view(4, 2)
    shards = [({"experts": whole[2:], "norm": torch.ones(2)}, 1), ({"experts": whole[:2], "norm": torch.ones(2)}, 0)]
    merged = merge_shards(shards, shapes)
    assert torch.equal(merged["experts"], whole) and torch.equal(merged["norm"], torch.ones(2))
    with pytest.raises(KeyError, match="a model-\\*-ep<i>.pt file is missing"):
        merge_shards(shards[:1], shapes)

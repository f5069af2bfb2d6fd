"""model.init_from under pipeline x expert parallelism: each rank reads from the Hugging Face folder
exactly the bytes of what it holds (its pipeline stage; of each expert stack, its experts' rows),
and what it holds equals the whole model read on one process, bit for bit."""
import warnings

import pytest
import torch

from moetron.models import get_spec
from moetron.models.deepseek_v3 import load_preset
from moetron.models.hf import load_hf_folder, to_hf
from moetron.parallel.dims import ParallelDims, Topology, build_groups
from moetron.parallel.materialize import expert_rows, held_state_dict, materialize
from moetron.pipeline.builders import build_schedule
from tests.dist.harness import run_ranks

pytest.importorskip("transformers")
PP, EP, MICRO = 2, 2, 4


def _config():
    return load_preset("tiny", num_hidden_layers=4, n_routed_experts=8, num_nextn_predict_layers=1)


def _save_sharded_folder(folder) -> None:
    """A random tiny DeepSeek-V3 as transformers saves a large model: several safetensors shards and
    their index, routed experts one entry per expert; MTP in moetron's file beside them."""
    torch.manual_seed(3)
    cfg = _config()
    spec = get_spec(cfg.arch)
    model = spec.build_module(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.normal_()  # routing biases are read too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_hf(model).save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    spec.hf.save_extra(model, folder)


def _rank_reads(rank, world, folder):
    """Build as the trainer builds (meta, EP shards, this rank's stage materialised), then read."""
    cfg = _config()
    spec = get_spec(cfg.arch)
    groups = build_groups(ParallelDims(pp=PP, dp=1, ep=EP), Topology(1, world), rank)
    model = spec.build(cfg, device="meta").train()
    spec.parallelize(model, groups, "alltoall", defer_weights=False)
    parts = spec.pipeline_split(model, build_schedule("1f1b", PP, MICRO), groups.pp_rank, None, MICRO)
    materialize(model, parts.held_modules, torch.device("cpu"), seed=0)
    read, total = spec.read_hf(cfg, folder, model)
    held = {k: t.clone() for k, t in held_state_dict(model).items()}
    return {"read": read, "total": total, "held": held, "rows": expert_rows(model)}


def test_each_rank_reads_only_what_it_holds(tmp_path):
    folder = tmp_path / "hf"
    _save_sharded_folder(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 3  # the index path, several files
    whole = load_hf_folder(_config(), folder)
    ranks = run_ranks(PP * EP, _rank_reads, folder)
    total = ranks[0]["total"]
    whole_bytes = sum(t.numel() * t.element_size() for t in whole.values())
    for rank, got in enumerate(ranks):
        held_bytes = sum(t.numel() * t.element_size() for t in got["held"].values())
        assert got["read"] == held_bytes, rank  # its share and the tensors it replicates, nothing more
        assert got["read"] < 0.6 * whole_bytes, rank  # a stage of two, half of each expert stack
        for key, tensor in got["held"].items():
            src = whole[key]
            if key in got["rows"]:
                first = got["rows"][key][0]
                src = src[first:first + tensor.shape[0]]
            assert torch.equal(tensor, src), (rank, key)
    assert whole_bytes <= total  # the files hold every tensor once (and headers)
    # every tensor of the whole model is held by some rank; each expert row by exactly one per stage
    assert set().union(*(got["held"] for got in ranks)) == set(whole)
    expert_keys = [k for k in ranks[0]["rows"]]
    for key in expert_keys:
        holders = [got for got in ranks if key in got["held"]]
        assert sum(got["held"][key].shape[0] for got in holders) == whole[key].shape[0], key


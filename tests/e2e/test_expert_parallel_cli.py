"""Expert parallelism through the CLI: torchrun ranks reproduce the single-process loss curve."""

import pytest

from tests.e2e.test_train_cli import read_metrics, run_cli
from tests.forked_cli import run_module

SMALL = ["train.max_steps=5", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
         "logging.progress=false"]


def torchrun(nproc, args, cwd):
    """moetron-train on `nproc` ranks as torchrun starts them, forked from this process (tests.forked_cli)."""
    proc = run_module("moetron.train", args, cwd, nproc, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_same_curve(reference, other):
    assert [r["step"] for r in other] == [r["step"] for r in reference]
    for a, b in zip(reference, other, strict=True):
        # float32; the expert outputs of a token are summed in another order across ranks: 1e-5 relative
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["loss/mtp"] == pytest.approx(a["loss/mtp"], rel=1e-5)


def test_ep4_on_one_node_matches_ep1(tmp_path):
    run_cli([*SMALL, f"hydra.run.dir={tmp_path / 'ep1'}"], tmp_path)
    proc = torchrun(4, ["model=tiny", "parallel.ep=4", *SMALL, f"hydra.run.dir={tmp_path / 'ep4'}"], tmp_path)
    assert "placement: pp=1 dp=1 ep=4" in proc.stdout
    ep1, ep4 = read_metrics(tmp_path / "ep1"), read_metrics(tmp_path / "ep4")
    assert_same_curve(ep1, ep4)
    assert all(r["comm/a2a_bytes/nvlink"] > 0 and r["comm/a2a_bytes/ib"] == 0 for r in ep4)
    for a, b in zip(ep1, ep4, strict=True):
        # model FLOPs per token (TFLOP/s per rank x ranks / tokens/s) do not depend on the layout: each
        # EP rank holds a quarter of the routed experts, and the figure used to shrink with them
        assert b["throughput/tflops"] * 4 / b["throughput/tokens_per_s"] == pytest.approx(
            a["throughput/tflops"] / a["throughput/tokens_per_s"], rel=1e-12)


def test_ep4_over_two_virtual_nodes_with_node_limited_routing_resumes(tmp_path):
    two_nodes = ["model.n_group=2", "model.topk_group=1", *SMALL]
    run_cli([*two_nodes, f"hydra.run.dir={tmp_path / 'ep1'}"], tmp_path)
    ep_args = ["parallel.ep=4", "parallel.dispatcher=hierarchical", "cluster.nodes=2", "cluster.gpus_per_node=2",
               *two_nodes, f"hydra.run.dir={tmp_path / 'ep4'}"]
    torchrun(4, [*ep_args, "train.exit_after_steps=3"], tmp_path)
    proc = torchrun(4, ep_args, tmp_path)  # resumes from the sharded checkpoint of step 3
    assert "at step 3" in proc.stdout
    ep4 = read_metrics(tmp_path / "ep4")
    assert_same_curve(read_metrics(tmp_path / "ep1"), ep4)
    assert all(r["comm/a2a_bytes/ib"] > 0 for r in ep4)
    step = tmp_path / "ep4" / "checkpoints" / "step_00000005"
    assert sorted(p.name for p in step.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]  # one per rank


@pytest.mark.parametrize("override,message", [
    ("parallel.ep=3", "model.n_routed_experts=8 is not divisible by parallel.ep=3"),
    ("parallel.dispatcher=nccl", "parallel.dispatcher='nccl'"),
])
def test_invalid_expert_parallel_settings(tmp_path, override, message):
    proc = run_cli([*SMALL, override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_deepep_needs_its_library_cuda_and_eight_gpus_per_node(tmp_path):
    env = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"}  # validation runs before any rank meets
    proc = run_cli([*SMALL, "parallel.ep=4", "parallel.dispatcher=deepep", "cluster.nodes=2",
                    "cluster.gpus_per_node=2", "model.n_group=2", f"hydra.run.dir={tmp_path / 'run'}"],
                   tmp_path, env_extra=env, check=False)
    assert proc.returncode == 2
    for message in ("needs DeepEP installed", "runs on CUDA GPUs only", "set cluster.gpus_per_node=8"):
        assert message in proc.stderr, message


def test_node_limited_routing_must_map_groups_to_nodes(tmp_path):
    env = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"}  # validation runs before any rank meets
    proc = run_cli([*SMALL, "parallel.ep=4", "cluster.nodes=2", "cluster.gpus_per_node=2",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env_extra=env, check=False)
    assert proc.returncode == 2 and "set model.n_group=2" in proc.stderr

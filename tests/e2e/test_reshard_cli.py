"""Checkpoints move between layouts: a run stopped and resumed four times, each time with another
pp, ep, dp, schedule and zero1, trains as one uninterrupted process does, and its checkpoints hold
the same model and optimizer state."""
import pytest
from omegaconf import OmegaConf

from moetron.checkpoint import dcp_io
from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli

RUN = ["model=tiny", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2", "logging.progress=false",
       "train.max_steps=8", "train.ckpt_every=2"]
# each leg trains 2 steps from where the previous one stopped
LEGS = [(4, ["parallel.ep=2", "parallel.dp=2"]),  # ZeRO-1 (on: dp > 1) over dp x ep, experts split in two
        (2, ["parallel.pp=2", "parallel.schedule=dualpipe"]),  # two copies of every stage, no ZeRO-1
        (2, ["parallel.dp=2", "parallel.zero1=false"]),
        (1, [])]


def test_a_run_resumed_in_other_layouts_equals_an_uninterrupted_one(tmp_path):
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    run_cli([*RUN, f"hydra.run.dir={whole}"], tmp_path)
    for nproc, layout in LEGS:
        args = [*RUN, *layout, "train.exit_after_steps=2", f"hydra.run.dir={moved}"]
        proc = torchrun(nproc, args, tmp_path) if nproc > 1 else run_cli(args, tmp_path)
        assert "does not fit" not in proc.stderr

    reference, resumed = read_metrics(whole), read_metrics(moved)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(reference, resumed, strict=True):
        # float32; shards and micro-batches sum in other orders: 1e-5 relative
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["tokens"] == a["tokens"]

    step = "checkpoints/step_00000008"
    expected, got = dcp_io.load_whole(whole / step, ""), dcp_io.load_whole(moved / step, "")
    assert set(got) == set(expected)
    assert any(k.startswith("optim/") and k.endswith("/exp_avg_sq") for k in got)  # the moments travelled too
    for name, tensor in expected.items():
        scale = tensor.double().abs().max().clamp_min(1e-12)
        assert float((got[name].double() - tensor.double()).abs().max() / scale) < 1e-5, name


def test_a_checkpoint_of_other_model_settings_stops_with_the_reason(tmp_path):
    run_dir = tmp_path / "run"
    run_cli([*RUN, "train.max_steps=2", f"hydra.run.dir={run_dir}"], tmp_path)
    proc = run_cli([*RUN, "model.num_hidden_layers=4", f"hydra.run.dir={run_dir}"], tmp_path,
                   env_extra={"HYDRA_FULL_ERROR": "0"}, check=False)
    assert proc.returncode != 0
    assert "holds weights of another model: model.num_hidden_layers=3 (now 4)" in proc.stderr
    assert "train.resume=false" not in proc.stderr  # refused there: the advice names what works
    assert "in a new hydra.run.dir" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_resume_may_change_run_settings_and_says_which(tmp_path):
    """Recomputation is a run setting, not part of the model: a run resumed with it on goes on (and,
    recomputation being bitwise, trains exactly as the uninterrupted run without it)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = [*RUN, "train.max_steps=4"]
    run_cli([*args, f"hydra.run.dir={whole}"], tmp_path)
    stopped = run_cli([*args, "train.exit_after_steps=2", f"hydra.run.dir={split}"], tmp_path)
    assert "stopped: step 2/4" in stopped.stdout and "done:" not in stopped.stdout  # "done" only when finished
    proc = run_cli([*args, "recompute.swiglu=true", "recompute.norm=true", f"hydra.run.dir={split}"], tmp_path)
    assert "done: step 4/4" in proc.stdout
    assert "run settings changed since step_00000002: recompute.norm: False -> True; recompute.swiglu: False -> " \
        "True" in proc.stdout
    assert [m["loss"] for m in read_metrics(split)] == [m["loss"] for m in read_metrics(whole)]


def test_a_run_whose_checkpoints_all_fail_to_load_stops_instead_of_starting_over(tmp_path):
    """Starting over would overwrite metrics.jsonl, and the new checkpoints (older steps) would be
    pruned first: the run stops, naming what failed."""
    run_dir = tmp_path / "run"
    run_cli([*RUN, "train.max_steps=2", f"hydra.run.dir={run_dir}"], tmp_path)
    step = run_dir / "checkpoints" / "step_00000002"
    (step / "__0_0.distcp").write_bytes(b"truncated")
    metrics = (run_dir / "metrics.jsonl").read_text()
    proc = run_cli([*RUN, "train.max_steps=4", f"hydra.run.dir={run_dir}"], tmp_path,
                   env_extra={"HYDRA_FULL_ERROR": "0"}, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no checkpoint in" in proc.stderr and "step_00000002" in proc.stderr and "new hydra.run.dir" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == metrics and step.is_dir()


def test_a_context_extension_stage_starts_from_an_exported_pretrained_model(tmp_path):
    """The stage adds YaRN and more positions to a model exported without them: init_from takes it."""
    run_cli([*RUN, "train.max_steps=2", f"hydra.run.dir={tmp_path / 'pre'}"], tmp_path)
    run_cli([str(tmp_path / "pre"), "--hf", str(tmp_path / "hf")], tmp_path, module="moetron.train.export_cli")
    run_cli(["model=tiny", "stage=long_context_32k", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=4",
             "train.max_steps=1", "logging.progress=false", f"model.init_from={tmp_path / 'hf'}",
             f"hydra.run.dir={tmp_path / 'ctx'}"], tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path / "ctx")] == [1]
    saved = OmegaConf.load(tmp_path / "ctx" / ".hydra" / "config.yaml").model
    assert saved.rope_scaling.type == "yarn" and saved.rope_scaling.factor == 40
    assert saved.max_position_embeddings == 163840
    # the pre-trained weights, moved by one AdamW step at the stage's 7.3e-6 (a fresh initialisation
    # would differ by ~0.02); the routing biases move by the balance speed instead
    pre = dcp_io.load_whole(tmp_path / "pre" / "checkpoints" / "step_00000002", "model/")
    ctx = dcp_io.load_whole(tmp_path / "ctx" / "checkpoints" / "step_00000001", "model/")
    assert set(ctx) == set(pre)
    for name, weight in pre.items():
        if not name.endswith("expert_bias"):
            assert float((ctx[name] - weight).abs().max()) < 1e-4, name

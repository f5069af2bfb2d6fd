"""The report's recipe as a user runs it: a batch-size ramp that every layout and a resumed run
follow step for step."""
import pytest

from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli

RAMP = ["model=tiny", "train.seq_len=64", "train.global_batch=16", "train.micro_batch=2", "logging.progress=false",
        "train.max_steps=6", "train.batch_ramp=[8,4,3000]", "train.ckpt_every=3"]


def test_a_batch_ramp_is_the_same_in_a_pipeline_and_across_a_resume(tmp_path):
    run_cli([*RAMP, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    torchrun(2, [*RAMP, "parallel.pp=2", "parallel.schedule=dualpipe", f"hydra.run.dir={tmp_path / 'dual'}"], tmp_path)
    torchrun(2, [*RAMP, "parallel.ep=2", "train.exit_after_steps=3", f"hydra.run.dir={tmp_path / 'moved'}"], tmp_path)
    run_cli([*RAMP, f"hydra.run.dir={tmp_path / 'moved'}"], tmp_path)  # resumed mid-ramp in another layout
    one = read_metrics(tmp_path / "one")
    assert [m["train/global_batch"] for m in one] == [8, 8, 8, 12, 12, 16]  # 3000 tokens: one step of 4 each 1500
    assert [m["tokens"] for m in one] == [512, 1024, 1536, 2304, 3072, 4096]
    for name in ("dual", "moved"):
        other = read_metrics(tmp_path / name)
        assert [m["train/global_batch"] for m in other] == [8, 8, 8, 12, 12, 16]
        for a, b in zip(one, other, strict=True):  # float32; micro-batches and expert shards sum in another order
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (name, a["step"])


def test_a_ramp_the_schedule_cannot_run_is_refused_naming_the_batch(tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "HYDRA_FULL_ERROR": "0"}
    proc = run_cli([*RAMP, "train.batch_ramp=[4,4,3000]", "parallel.pp=2", "parallel.schedule=dualpipe",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env_extra=env, check=False)
    assert proc.returncode == 2 and "the ramp's batch 4 (train.batch_ramp)" in proc.stderr


@pytest.mark.parametrize("stage,seq_len,batch", [("long_context_32k", 32768, 1920), ("long_context_128k", 131072, 480)])
def test_the_context_extension_stages_hold_the_reports_settings(tmp_path, stage, seq_len, batch):
    proc = run_cli(["model=v3_671b", "optim=deepseek_v3", f"stage={stage}", "--cfg", "job"], tmp_path)
    for line in (f"seq_len: {seq_len}", f"global_batch: {batch}", "max_steps: 1000", "factor: 40", "type: yarn",
                 "mscale_all_dim: 1.0", "lr: 7.3e-06"):
        assert line in proc.stdout, line


def test_a_context_extension_stage_trains_with_yarn(tmp_path):
    run_cli(["model=tiny", "stage=long_context_32k", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=8",
             "train.max_steps=2", "logging.progress=false", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert [m["lr"] for m in read_metrics(tmp_path / "run")] == [7.3e-6, 7.3e-6]


def test_the_parameter_average_is_evaluated_and_carried_across_a_resume_in_another_layout(tmp_path):
    args = ["model=tiny", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=4", "logging.progress=false",
            "train.max_steps=6", "train.ema_decay=0.5", "train.eval_every=3", "train.eval_ema=true",
            "train.ckpt_every=3"]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path)
    torchrun(2, [*args, "parallel.ep=2", "train.exit_after_steps=3", f"hydra.run.dir={tmp_path / 'moved'}"], tmp_path)
    run_cli([*args, f"hydra.run.dir={tmp_path / 'moved'}"], tmp_path)
    whole, moved = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "moved")
    for a, b in zip(whole, moved, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        if "eval/loss" in a:  # the average, not the parameters: it trails the training loss
            assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-5)
    assert whole[5]["eval/loss"] < whole[2]["eval/loss"]

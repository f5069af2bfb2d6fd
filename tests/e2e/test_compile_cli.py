"""train.compile=true: each decoder and MTP block compiled with torch.compile equals eager within
float32 rounding, with selective recomputation, and under a pipeline with weight-gradient deferral
(ZB1P) and expert parallelism (its collectives are graph breaks) at once."""
import pytest

from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import FAST, read_metrics, run_cli

RUN = ["model=tiny", "train.max_steps=3", *FAST, "train.micro_batch=2"]


def _losses(run_dir):
    return [m["loss"] for m in read_metrics(run_dir)]


def test_compiled_blocks_equal_eager_with_recompute(tmp_path):
    recompute = ["model.recompute_norm=true", "model.recompute_mla_up_proj=true", "model.recompute_swiglu=true"]
    for compiled in ("false", "true"):
        run_cli([*RUN, *recompute, f"train.compile={compiled}", f"hydra.run.dir={tmp_path / compiled}"], tmp_path)
    assert _losses(tmp_path / "true") == pytest.approx(_losses(tmp_path / "false"), rel=1e-6)


def test_compiled_blocks_equal_eager_under_pipeline_and_expert_parallelism(tmp_path):
    layout = ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=zb1p"]
    for compiled in ("false", "true"):
        torchrun(4, [*RUN, *layout, f"train.compile={compiled}", f"hydra.run.dir={tmp_path / compiled}"], tmp_path)
    assert _losses(tmp_path / "true") == pytest.approx(_losses(tmp_path / "false"), rel=1e-6)

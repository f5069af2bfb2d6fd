"""A second architecture, registered from outside the package (tests/fakes/toy_dense.py), trains
with `moetron-train` in one process, at pp=2 and at dp=2, with no change to src/train/: the trainer
finds everything through the model spec of `model.arch`."""
import ast
import os
from pathlib import Path

import pytest

from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli

REPO = Path(__file__).resolve().parents[2]
TOY = ["imports=[tests.fakes.toy_dense]", f"hydra.searchpath=[file://{REPO / 'tests' / 'fakes' / 'conf'}]",
       "model=toy_dense", "train.max_steps=4", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
       "logging.progress=false"]


def _env():  # the toy module lives in the repository's tests package
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_a_registered_dense_decoder_trains_in_every_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    run_cli([*TOY, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, env_extra=_env())
    one = read_metrics(tmp_path / "one")
    assert "loss/mtp" not in one[0] and "moe/maxvio_batch" not in one[0]  # the spec says what it reports
    assert one[-1]["loss"] < one[0]["loss"]
    for name, args in (("pp2", ["parallel.pp=2"]), ("dp2", [])):
        torchrun(2, [*TOY, *args, f"hydra.run.dir={tmp_path / name}"], tmp_path)
        rows = read_metrics(tmp_path / name)
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        for a, b in zip(one, rows, strict=True):
            # float32; the batch is split over ranks or stages and summed in another order: 1e-5 relative
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
            # FLOPs per token come from the spec's config: the same in every layout
            assert b["throughput/tflops"] * 2 / b["throughput/tokens_per_s"] == pytest.approx(
                a["throughput/tflops"] / a["throughput/tokens_per_s"], rel=1e-12)


def test_an_unknown_arch_names_the_imports_key(tmp_path):
    proc = run_cli(["model.arch=llama", "train.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                   env_extra=_env(), check=False)
    assert proc.returncode == 2
    assert "model.arch='llama' is unknown" in proc.stderr and "imports=[your.module]" in proc.stderr


def test_the_trainer_imports_no_model():
    """src/train/ reaches models through moetron.models (the registry and specs) only."""
    for path in (REPO / "src" / "train").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert "deepseek_v3" not in node.module, f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert all("deepseek_v3" not in alias.name for alias in node.names), path.name

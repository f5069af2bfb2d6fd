"""Every family of the zoo trains through `moetron-train model=<preset>` in every layout: expert
parallelism with ZeRO-1 over dp=2 and a DualPipeV pipeline reproduce one process over 8 steps, and
FP8 trains under expert parallelism and a pipeline."""
import pytest

from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli

ZOO = ["qwen3_moe_tiny", "mixtral_tiny", "deepseek_v2_tiny", "gpt_oss_tiny"]
RUN = ["train.max_steps=8", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
       "logging.progress=false"]
FP8 = ["precision=fp8", "precision.backend=emulated", "precision.compute_dtype=float32"]


@pytest.mark.parametrize("preset", ZOO)
def test_every_layout_reproduces_one_process(preset, tmp_path):
    args = [f"model={preset}", *RUN]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    one = read_metrics(tmp_path / "one")
    assert one[-1]["loss"] < one[0]["loss"]
    # 4 ranks at ep=2: dp=2 (ZeRO-1 is on whenever dp > 1) with the experts sharded over 2 ranks
    layouts = {"dp2_ep2_zero1": (4, ["parallel.ep=2"]), "dualpipev": (2, ["parallel.pp=2", "parallel.schedule=dualpipev"])}
    for name, (nproc, layout) in layouts.items():
        proc = torchrun(nproc, [*args, *layout, f"hydra.run.dir={tmp_path / name}"], tmp_path)
        if name == "dp2_ep2_zero1":
            assert "placement: pp=1 dp=2 ep=2" in proc.stdout
        rows = read_metrics(tmp_path / name)
        assert [r["step"] for r in rows] == list(range(1, 9))
        for a, b in zip(one, rows, strict=True):
            # float32; tokens' expert outputs and gradients summed in another order over ranks: 1e-5 relative
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), name
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), name
            assert b["moe/load/layer_1"] == a["moe/load/layer_1"], name  # the same routing, every step


def test_fp8_trains_under_expert_parallelism_and_a_pipeline(tmp_path):
    """GPT-OSS, the family with the most of its own under FP8 (biased linears, biased experts, the
    clamped SwiGLU); every family's FP8 against float32: tests/unit/test_zoo_fp8.py."""
    args = ["model=gpt_oss_tiny", *RUN, *FP8]
    torchrun(4, [*args, "train.micro_batch=1", "parallel.ep=2", "parallel.pp=2", "parallel.schedule=dualpipev",
                 f"hydra.run.dir={tmp_path / 'fp8'}"], tmp_path)
    rows = read_metrics(tmp_path / "fp8")
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_global_batch_balance_and_z_loss_train_in_an_overlapped_pipeline(tmp_path):
    """balance_mode=global_aux_loss sums expert counts over the dp x ep ranks on a group of its own
    while DualPipeV's paired backward reduces gradients: 4 ranks train without a hang, and the loss
    logged includes the z-loss."""
    args = ["model=qwen3_moe_tiny", *RUN, "train.micro_batch=1", "model.balance_mode=global_aux_loss",
            "model.router_z_loss_coef=0.001"]
    torchrun(4, [*args, "parallel.ep=2", "parallel.pp=2", "parallel.schedule=dualpipev",
                 f"hydra.run.dir={tmp_path / 'global'}"], tmp_path)
    rows = read_metrics(tmp_path / "global")
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["loss/aux"] > 0 for r in rows)

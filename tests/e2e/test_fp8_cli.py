"""`precision=fp8` as a user runs it: the tiny model's loss moves no more than a change of precision
does, layouts agree, and a backend this machine cannot run is refused before any process group starts."""
import pytest

from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli

RUN = ["model=tiny", "train.seq_len=64", "train.global_batch=8", "logging.progress=false", "train.ckpt_every=1000"]


def _mean_last(run_dir, n):
    losses = [m["loss"] for m in read_metrics(run_dir)]
    return sum(losses[-n:]) / n


# benchmarks/cpu/fp8_loss.py --seeds 3 4 5 6 7 8 --steps 100 --last 30 --precisions fp32 bf16 fp8_fp32
# --baseline fp32 (BENCHMARKS.md, 2026-12-03): BF16 against float32, the mean loss of the last 30 of
# 100 steps, per seed: -0.05, +0.68, -0.01, +4.04, +0.06, -0.10% (standard deviation 1.63%): how far
# one trajectory of this model moves with a change of precision that nobody calls an error (seed 6
# meets a loss spike in BF16 only). FP8 in the same runs: -0.09, -0.11, +0.29, +0.71, -0.00, -0.00%.
SIGMA_BF16 = 0.0163
SEEDS = (3, 4)


def test_fp8_loss_stays_within_the_noise_of_a_precision_change(tmp_path):
    """The report's FP8 loss error is under 0.25% against BF16. One trajectory of a small model moves
    by more than that with any change of rounding, either way, so one seed cannot show it. FP8's own
    error (FP8 GEMMs in a float32 framework against float32, all else equal) is taken as the mean
    over two seeds, two-sided, and held to two standard errors of the measured BF16-vs-float32
    spread (2 x 1.63% / sqrt(2) = 2.3%): FP8 may move the loss no more than BF16 does. That bound is loose because the
    noise is: it catches an FP8 error that shifts the loss systematically (a wrong scale, a lost
    tile), not one of a tenth of a percent, which this model cannot resolve (the benchmark's six
    seeds put FP8 at +0.13% +- 0.32%)."""
    bound = 2 * SIGMA_BF16 / len(SEEDS) ** 0.5
    args = [*RUN, "train.micro_batch=8", "train.max_steps=100", "optim.decay_steps=100"]
    diffs = []
    for seed in SEEDS:
        fp8, fp32 = tmp_path / f"fp8_{seed}", tmp_path / f"fp32_{seed}"
        run_cli([*args, f"train.seed={seed}", "precision=fp8", "precision.backend=emulated",
                 "precision.compute_dtype=float32", f"hydra.run.dir={fp8}"], tmp_path)
        run_cli([*args, f"train.seed={seed}", "precision=fp32", f"hydra.run.dir={fp32}"], tmp_path)
        diffs.append((_mean_last(fp8, 30) - _mean_last(fp32, 30)) / _mean_last(fp32, 30))
        assert read_metrics(fp8)[-1]["loss"] < 0.6 * read_metrics(fp8)[0]["loss"]  # it learns
    mean = sum(diffs) / len(diffs)
    assert abs(mean) <= bound, (diffs, bound)


def test_fp8_layouts_agree_with_one_process(tmp_path):
    """Forward GEMMs and input gradients quantize per token (1x128 tiles along the features), so a
    pipeline equals one process to float32 rounding. Weight gradients quantize 128 tokens per tile:
    under EP an expert's rows arrive from several ranks in another order, so its tiles group other
    tokens, and the curves agree to that rounding (5e-5 measured over 5 steps). The pipeline runs
    with activations cached in FP8 and the SwiGLU recomputed from its FP8 inputs (the report's
    combination), against one process that does the same."""
    args = [*RUN, "train.micro_batch=2", "train.max_steps=4", "precision=fp8", "precision.compute_dtype=float32"]
    cached = [*args, "precision.fp8_cache_activations=true", "recompute.swiglu=true"]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    run_cli([*cached, f"hydra.run.dir={tmp_path / 'one_cached'}"], tmp_path)
    torchrun(2, [*cached, "parallel.pp=2", "parallel.schedule=zb1p", f"hydra.run.dir={tmp_path / 'pp2'}"], tmp_path)
    torchrun(2, [*args, "parallel.ep=2", f"hydra.run.dir={tmp_path / 'ep2'}"], tmp_path)
    one, one_cached, pp2, ep2 = (read_metrics(tmp_path / name) for name in ("one", "one_cached", "pp2", "ep2"))
    assert ep2[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)  # the first forward: per-token quantization
    assert one_cached[0]["loss"] == one[0]["loss"]  # caching and recomputing change the backward only
    for a, a_cached, b, c in zip(one, one_cached, pp2, ep2, strict=True):
        assert b["loss"] == pytest.approx(a_cached["loss"], rel=1e-5)
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert a_cached["loss"] == pytest.approx(a["loss"], rel=1e-2)


def test_a_backend_this_machine_cannot_run_is_refused_before_any_rank_starts(tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "HYDRA_FULL_ERROR": "0"}  # no rank ever meets
    proc = run_cli([*RUN, "precision=fp8", "precision.backend=torch", "parallel.ep=2",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env_extra=env, check=False)
    assert proc.returncode == 2
    assert "precision.backend=torch needs a CUDA GPU" in proc.stderr and "precision.backend=emulated" in proc.stderr
    assert "Traceback" not in proc.stderr

"""`precision=fp8` as a user runs it: the tiny model trains within a quarter percent of BF16, layouts
agree, and a backend this machine cannot run is refused before any process group starts."""
import pytest

from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli

RUN = ["model=tiny", "train.seq_len=64", "train.global_batch=8", "logging.progress=false", "train.ckpt_every=1000"]


def _mean_last(run_dir, n=50):
    losses = [m["loss"] for m in read_metrics(run_dir)]
    return sum(losses[-n:]) / n


def test_fp8_training_loses_at_most_a_quarter_percent_against_bf16(tmp_path):
    """The report's bound on FP8's loss error: at most 0.25% above BF16 (one-sided: lower is no
    error). One seed of a small model drifts by a few tenths of a percent either way with any change
    of the trajectory (measured between -0.29% and +0.10% over this session's changes; BF16 itself is
    0.06% from float32), so the comparison averages the last 50 steps of a whole (decayed) run."""
    args = [*RUN, "train.micro_batch=8", "train.max_steps=150", "optim.decay_steps=150"]
    run_cli([*args, "precision=fp8", "precision.backend=emulated", f"hydra.run.dir={tmp_path / 'fp8'}"], tmp_path)
    run_cli([*args, "precision=bf16", f"hydra.run.dir={tmp_path / 'bf16'}"], tmp_path)
    fp8, bf16 = _mean_last(tmp_path / "fp8"), _mean_last(tmp_path / "bf16")
    assert read_metrics(tmp_path / "fp8")[-1]["loss"] < 0.5 * read_metrics(tmp_path / "fp8")[0]["loss"]  # it learns
    assert (fp8 - bf16) / bf16 < 0.0025, (fp8, bf16)


def test_fp8_layouts_agree_with_one_process(tmp_path):
    """Forward GEMMs and input gradients quantize per token (1x128 tiles along the features), so a
    pipeline equals one process to float32 rounding. Weight gradients quantize 128 tokens per tile:
    under EP an expert's rows arrive from several ranks in another order, so its tiles group other
    tokens, and the curves agree to that rounding (5e-5 measured over 5 steps). The pipeline runs
    with activations cached in FP8, against one process that caches them too."""
    args = [*RUN, "train.micro_batch=2", "train.max_steps=4", "precision=fp8", "precision.compute_dtype=float32"]
    cached = [*args, "precision.fp8_cache_activations=true"]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    run_cli([*cached, f"hydra.run.dir={tmp_path / 'one_cached'}"], tmp_path)
    torchrun(2, [*cached, "parallel.pp=2", "parallel.schedule=zb1p", f"hydra.run.dir={tmp_path / 'pp2'}"], tmp_path)
    torchrun(2, [*args, "parallel.ep=2", f"hydra.run.dir={tmp_path / 'ep2'}"], tmp_path)
    one, one_cached, pp2, ep2 = (read_metrics(tmp_path / name) for name in ("one", "one_cached", "pp2", "ep2"))
    assert ep2[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)  # the first forward: per-token quantization
    assert one_cached[0]["loss"] == one[0]["loss"]  # caching changes the backward only
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

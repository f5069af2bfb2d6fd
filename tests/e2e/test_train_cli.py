"""moetron-train and moetron-data as a user runs them (subprocesses, CPU, float32)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from moetron.checkpoint import dcp_io

from tests.forked_cli import run_module

FAST = ["train.seq_len=64", "train.global_batch=8", "train.micro_batch=4", "logging.progress=false"]


def run_cli(args, cwd, module="moetron.train", env_extra=None, check=True, nproc=1, fork=True):
    """`python -m module args` in `cwd` (on `nproc` ranks), forked from this process (tests.forked_cli)."""
    proc = run_module(module, args, cwd, nproc, env_extra={"HYDRA_FULL_ERROR": "1", **(env_extra or {})}, fork=fork)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_documented_command_works_as_written(tmp_path):
    exe = shutil.which("moetron-train")
    assert exe, "moetron-train is not on PATH: pip install -e ."
    run_dir = tmp_path / "DIR"
    proc = subprocess.run([exe, "model=tiny", "train.max_steps=30", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                          env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 31))
    required = {"loss", "loss/lm", "loss/mtp", "loss/seq_aux", "lr", "grad_norm", "throughput/tokens_per_s",
                "throughput/tflops", "throughput/mfu", "moe/maxvio_batch", "moe/maxvio_batch/layer_1",
                "moe/load/layer_1", "moe/bias_abs_mean/layer_1", "memory/peak_gib", "memory/activations_gib",
                "step_time_s"}
    assert required <= rows[-1].keys()
    assert 0 < rows[-1]["memory/activations_gib"] < rows[-1]["memory/peak_gib"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 2.0  # byte-level LM: ~8.1 at init, < 6 after 30 steps
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "step_00000030" / "COMPLETE").is_file()
    assert "done: step 30/30" in proc.stdout
    again = subprocess.run([exe, "model=tiny", "train.max_steps=30", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                           env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert len(read_metrics(run_dir)) == 30


def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path):
    common = ["train.max_steps=8", "train.ckpt_every=3", *FAST]
    run_cli([*common, f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path)
    run_cli([*common, "train.exit_after_steps=5", f"hydra.run.dir={tmp_path / 'split'}"], tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3, 4, 5]
    second = run_cli([*common, f"hydra.run.dir={tmp_path / 'split'}"], tmp_path)
    assert "resuming" in second.stdout and "at step 5" in second.stdout
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    keys = ("loss", "loss/lm", "loss/mtp", "loss/seq_aux", "grad_norm", "lr", "moe/load/layer_1")
    # CPU float32 with deterministic algorithms: every logged value is bit-for-bit the same.
    assert [[r[k] for k in keys] for r in split] == [[r[k] for k in keys] for r in whole]
    final = "checkpoints/step_00000008"
    a, b = dcp_io.load_whole(tmp_path / "whole" / final, ""), dcp_io.load_whole(tmp_path / "split" / final, "")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_and_partial_checkpoints_are_skipped_and_kept(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(["train.max_steps=4", "train.ckpt_every=2", "train.ckpt_keep=3", *FAST, f"hydra.run.dir={run_dir}"], tmp_path)
    ckpts = run_dir / "checkpoints"
    (ckpts / "step_00000004" / "__0_0.distcp").write_bytes(b"not a checkpoint")
    partial = ckpts / "step_00000006"
    partial.mkdir()
    proc = run_cli(["train.max_steps=5", "train.ckpt_every=2", "train.ckpt_keep=3", *FAST, f"hydra.run.dir={run_dir}"],
                   tmp_path)
    assert f"skipping incomplete checkpoint {partial}" in proc.stderr
    assert f"skipping corrupt checkpoint {ckpts / 'step_00000004'}" in proc.stderr
    assert "at step 2" in proc.stdout
    assert partial.is_dir() and (ckpts / "step_00000004").is_dir()  # never deleted silently
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]  # steps 3-4 retrained, logged once


BAD_INPUT = [
    ("train.max_stepz=3", "train.max_stepz is not a setting: did you mean train.max_steps?"),
    ("model.hiden_size=8", "model.hiden_size is not a setting: did you mean model.hidden_size?"),
    ("optim.lr=fast", "optim.lr"),
    ("train.global_batch=10", "train.global_batch=10 must be a multiple of train.micro_batch"),
    ("data.path=missing/corpus", "data file not found: missing/corpus.json"),
    ("parallel.pp=2", "world size 1 != parallel.pp*parallel.dp*parallel.ep = 2*1*1: launch 2 ranks"),
    ("logging.wandb.mode=sometimes", "logging.wandb.mode"),
    # numbers out of range name the key, the value and the bound, with no traceback
    ("parallel.ep=0", "parallel.ep=0 must be at least 1"),
    ("train.seq_len=0", "train.seq_len=0 must be at least 2"),
    ("optim.lr=-1", "optim.lr=-1.0 must be positive"),
    ("train.max_steps=-5", "train.max_steps=-5 must be at least 1"),
    ("optim.beta2=1.5", "optim.beta2=1.5 must be in [0, 1)"),
    ("model.hidden_size=0", "model.hidden_size=0 must be at least 1"),
    # a key added with Hydra's `+` (the fix Hydra suggests for a misspelled one) is refused too
    ("+train.max_step=10", "train.max_step: Key 'max_step' not in 'TrainSettings'"),
]


@pytest.mark.parametrize("override,message", BAD_INPUT)
def test_bad_input_gets_a_clear_error(tmp_path, override, message):
    """Every check a run makes before its process groups, in one process (what `moetron-train
    --check` and each rank at its start run: moetron.train.preflight)."""
    from moetron.core.errors import UserInputError
    from moetron.train.config import register_configs
    from moetron.train.preflight import preflight
    register_configs()
    first = [] if override.startswith("train.max_steps") else ["train.max_steps=1"]
    with pytest.raises(UserInputError) as err:
        preflight([*first, *FAST, override, f"hydra.run.dir={tmp_path / 'run'}"], world_size=1, full=True)
    assert message in str(err.value)


@pytest.mark.parametrize("override,message", [BAD_INPUT[0], BAD_INPUT[5], BAD_INPUT[-1]])
def test_bad_input_gets_one_message_and_no_traceback_from_the_command(tmp_path, override, message):
    proc = run_cli(["train.max_steps=1", *FAST, override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, check=False,
                   env_extra={"HYDRA_FULL_ERROR": "0"})  # as a user runs it: Hydra's short errors
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count("moetron-train: error:") == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_own_data_through_moetron_data(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}: " + "lorem ipsum " * 40}) + "\n" for i in range(50)))
    proc = run_cli([str(docs), "--output", str(tmp_path / "tok" / "corpus")], tmp_path, module="moetron.data.cli")
    assert "50 documents" in proc.stdout
    run_cli(["train.max_steps=3", *FAST, "data.path=tok/corpus", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert len(read_metrics(tmp_path / "run")) == 3
    with (tmp_path / "tok" / "corpus.bin").open("ab") as f:
        f.write(b"\x00")
    proc = run_cli(["train.max_steps=1", *FAST, "data.path=tok/corpus", f"hydra.run.dir={tmp_path / 'run2'}"],
                   tmp_path, check=False)
    assert proc.returncode == 2 and f"corrupt data file {Path('tok/corpus.bin')}" in proc.stderr


def test_sweep(tmp_path):
    run_cli(["-m", "model=tiny", "optim.lr=1e-3,3e-3", "train.max_steps=2", *FAST,
             f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    lrs = sorted(read_metrics(tmp_path / "sweep" / str(job))[0]["lr"] for job in (0, 1))
    assert lrs == pytest.approx([1e-3 / 20, 3e-3 / 20])  # first warmup step of 20


def test_wandb_offline_run_folder_with_expert_heatmaps(tmp_path):
    run_cli(["train.max_steps=2", *FAST, "logging.wandb.mode=offline", "logging.heatmap_every=1",
             f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs
    images = list(runs[0].rglob("media/images/moe/heatmap*.png"))
    assert len(images) == 2  # one per step


def test_data_parallel_matches_single_process(tmp_path):
    single = tmp_path / "single"
    run_cli(["train.max_steps=4", *FAST, f"hydra.run.dir={single}"], tmp_path)
    run_cli(["train.max_steps=4", *FAST, f"hydra.run.dir={tmp_path / 'dp2'}"], tmp_path, nproc=2,
            env_extra={"OMP_NUM_THREADS": "1"})
    single_rows, dp_rows = read_metrics(single), read_metrics(tmp_path / "dp2")
    assert len(single_rows) == len(dp_rows) == 4
    # Step 1: same weights, same tokens; loads are summed over both ranks before logging.
    assert dp_rows[0]["moe/load/layer_1"] == single_rows[0]["moe/load/layer_1"]
    for a, b in zip(single_rows, dp_rows, strict=True):
        # Same global batch split over 2 ranks: gradients are summed in another order, so float32
        # results agree to rounding (1e-5 relative), not bitwise.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_a_mistake_is_reported_once_by_two_ranks(tmp_path):
    """(tests/e2e/test_errors_once.py runs real torchrun.)"""
    proc = run_cli(["optim.lr=-1", *FAST, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, nproc=2,
                   env_extra={"OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("moetron-train: error: invalid config") == 1  # rank 0 says it; the others exit 2


def test_resume_false_in_a_run_directory_with_checkpoints_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(["train.max_steps=2", *FAST, f"hydra.run.dir={run_dir}"], tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    proc = run_cli(["train.max_steps=2", *FAST, "train.resume=false", f"hydra.run.dir={run_dir}"], tmp_path,
                   check=False)
    assert proc.returncode == 2 and "use a new hydra.run.dir" in proc.stderr and str(run_dir) in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing of the first run is touched

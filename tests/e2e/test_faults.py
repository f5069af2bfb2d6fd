"""A run that survives faults: stop signals end it with a checkpoint it resumes from, and a
non-finite gradient skips the step or stops the run with its name, never saving a NaN state."""
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.test_train_cli import FAST, read_metrics, run_cli
from tests.forked_cli import start_module

REPO = Path(__file__).resolve().parents[2]
TOY = ["imports=[tests.fakes.toy_dense]", f"hydra.searchpath=[file://{REPO / 'tests' / 'fakes' / 'conf'}]",
       "model=toy_dense", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=4", "logging.progress=false"]


def _wait_for_steps(run_dir: Path, steps: int, procs) -> None:
    for _ in range(600):
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert all(p.poll() is None for p in procs), "the run ended before the signal"
        time.sleep(0.1)
    raise AssertionError("the run did not reach the step")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_to_one_rank_checkpoints_every_rank_and_the_same_command_resumes(tmp_path, sig):
    """SLURM sends SIGUSR1 (--signal) or SIGTERM before a time limit; Ctrl-C sends SIGINT. Here it
    reaches rank 1 only: both ranks stop after the same step, with one complete checkpoint."""
    run_dir = tmp_path / "run"
    job = _two_ranks(tmp_path, ["train.max_steps=400", "train.ckpt_every=1000", *FAST, f"hydra.run.dir={run_dir}"])
    try:
        _wait_for_steps(run_dir, 3, [job])
    except AssertionError:  # a rank ended early, or the run never got there: end it, say why
        job.kill()
        raise AssertionError(job.finish().stderr[-3000:]) from None
    os.kill(job.pids[1], sig)
    done = job.finish()
    assert done.returncode == 0, done.stderr[-4000:]
    stopped = len(read_metrics(run_dir))
    assert 3 <= stopped < 400
    assert f"stopped by a stop signal on another rank after step {stopped}" in done.stdout
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{stopped:08d}"]
    done = _two_ranks(tmp_path, [f"train.max_steps={stopped + 2}", *FAST, f"hydra.run.dir={run_dir}"]).finish()
    assert f"at step {stopped}" in done.stdout, done.stderr[-2000:]  # the same command resumes
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, stopped + 3))


def _two_ranks(cwd, overrides):
    """Two ranks of moetron-train started as torchrun would (without its agent, so a signal reaches
    one rank), forked (tests.forked_cli)."""
    return start_module("moetron.train", overrides, cwd, nproc=2, env_extra={"OMP_NUM_THREADS": "1"})


def test_a_nonfinite_step_is_skipped_and_the_run_goes_on(tmp_path):
    # two micro-batches a step: the third forward pass is step 2's first
    run_cli([*TOY, "model.nan_at_forward=3", "train.on_nonfinite=skip", "train.max_steps=4",
             f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env_extra={"PYTHONPATH": str(REPO)})
    rows = read_metrics(tmp_path / "run")
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert rows[1]["grad_norm"] != rows[1]["grad_norm"]  # NaN, logged as it was
    assert all(r["loss"] == r["loss"] for r in rows[2:])  # the weights stayed finite: the step did nothing


def test_a_nonfinite_step_stops_the_run_naming_it_and_saves_nothing_from_it(tmp_path):
    proc = run_cli([*TOY, "model.nan_at_forward=3", "train.max_steps=4", "train.ckpt_every=1",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env_extra={"PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 3
    assert "step 2: the gradient norm is nan" in proc.stderr and "embed_tokens.weight" in proc.stderr
    assert "train.on_nonfinite=skip" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000001"]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1


def test_a_hung_peer_ends_the_run_with_a_message_naming_the_rank_the_phase_and_the_group(tmp_path):
    run_dir = tmp_path / "run"
    job = _two_ranks(tmp_path, ["train.max_steps=400", "train.ckpt_every=1000", "train.collective_timeout_s=3",
                                *FAST, f"hydra.run.dir={run_dir}"])
    try:
        _wait_for_steps(run_dir, 2, [job])
    except AssertionError:
        job.kill()
        raise AssertionError(job.finish().stderr[-3000:]) from None
    os.kill(job.pids[1], signal.SIGSTOP)  # hung: alive, but never answers (killed once rank 0 gave up)
    done = job.finish(timeout=120)
    err = done.stderr
    assert done.returncode == 3, err[-2000:]
    assert "rank 0 had no answer from a peer within train.collective_timeout_s=3 s during" in err
    assert re.search(r"\(its collectives here: (dp_ep group \[0, 1\]|world group \[0, 1\])", err), err[-2000:]
    assert "Traceback" not in err

"""A run that survives faults: stop signals end it with a checkpoint it resumes from, and a
non-finite gradient skips the step or stops the run with its name, never saving a NaN state."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_run_dir import _free_port
from tests.e2e.test_train_cli import FAST, read_metrics, run_cli

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
    procs = _two_ranks(tmp_path, ["train.max_steps=400", "train.ckpt_every=1000", *FAST, f"hydra.run.dir={run_dir}"])
    _wait_for_steps(run_dir, 3, procs)
    procs[1].send_signal(sig)
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    stopped = len(read_metrics(run_dir))
    assert 3 <= stopped < 400
    assert f"stopped by a stop signal on another rank after step {stopped}" in outputs[0][0]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{stopped:08d}"]
    procs = _two_ranks(tmp_path, [f"train.max_steps={stopped + 2}", *FAST, f"hydra.run.dir={run_dir}"])
    outputs = [p.communicate(timeout=600) for p in procs]
    assert f"at step {stopped}" in outputs[0][0], outputs[0][1][-2000:]  # the same command resumes
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, stopped + 3))


def _two_ranks(cwd, overrides):
    """Two ranks of moetron-train started as torchrun would (without its agent, so signals reach a rank)."""
    port, procs = _free_port(), []
    for rank in (0, 1):
        env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "moetron.train", *overrides], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


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
    procs = _two_ranks(tmp_path, ["train.max_steps=400", "train.ckpt_every=1000", "train.collective_timeout_s=3",
                                  *FAST, f"hydra.run.dir={run_dir}"])
    try:
        _wait_for_steps(run_dir, 2, procs)
        procs[1].send_signal(signal.SIGSTOP)  # hung: alive, but never answers
        out, err = procs[0].communicate(timeout=120)
        assert procs[0].returncode == 3, err[-2000:]
        assert "rank 0 had no answer from a peer within train.collective_timeout_s=3 s during" in err
        assert re.search(r"\(its collectives here: (dp_ep group \[0, 1\]|world group \[0, 1\])", err), err[-2000:]
        assert "Traceback" not in err
    finally:
        procs[1].kill()
        procs[1].wait()

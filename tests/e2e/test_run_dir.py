"""All ranks of a job write into one run directory, even when Hydra's default folder (named after
the second each process started) differs between them: rank 0 decides, the others follow."""
import os
import signal
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_started_in_different_seconds_share_rank_0s_run_directory(tmp_path):
    port = _free_port()
    args = [sys.executable, "-m", "moetron.train", "train.max_steps=2", "train.ckpt_every=1", "train.seq_len=64",
            "train.global_batch=8", "train.micro_batch=4", "logging.progress=false"]  # no hydra.run.dir
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        time.sleep(1.5)  # the next rank starts in another second: Hydra gives it another default folder
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[1][1][-3000:] + outputs[0][1][-3000:]
    run_dirs = sorted(p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir())
    assert len(run_dirs) == 1, run_dirs  # the follower's empty Hydra folder is gone
    run_dir = run_dirs[0]
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / ".hydra").is_dir()
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


def _metrics_rows(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_rows(run_dir, rows, proc):
    for _ in range(1200):
        if _metrics_rows(run_dir) >= rows:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach {rows} steps")


FAST = ["train.seq_len=64", "train.global_batch=8", "train.micro_batch=4", "logging.progress=false",
        "train.max_steps=400", "train.ckpt_every=1000"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def test_a_second_run_in_a_held_run_directory_is_refused_naming_the_first(tmp_path):
    """Two runs in one folder would resume from the same checkpoint and write one metrics.jsonl."""
    run = [sys.executable, "-m", "moetron.train", *FAST, f"hydra.run.dir={tmp_path / 'run'}"]
    first = subprocess.Popen(run, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_rows(tmp_path / "run", 2, first)
        second = subprocess.run(run, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"is in use by a run that is still alive: pid {first.pid} on" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
        assert _metrics_rows(tmp_path / "run") >= 2  # the first run's history is untouched
    finally:
        first.send_signal(signal.SIGTERM)  # stops with a checkpoint
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    rows = _metrics_rows(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / f"step_{rows:08d}" / "COMPLETE").is_file()


def test_ranks_whose_torchrun_died_stop_at_the_next_step_with_a_checkpoint(tmp_path):
    """torchrun's workers live in sessions of their own: kill -9 of the agent (or the OOM killer)
    leaves them running. They notice the new parent, agree in the step's metrics reduction, save a
    checkpoint and exit, freeing the run directory."""
    run_dir = tmp_path / "run"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "moetron.train", *FAST, f"hydra.run.dir={run_dir}"],
                             cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_rows(run_dir, 3, agent)
    finally:
        agent.kill()  # (on a failure above too: its workers then stop by themselves, as tested here)
    out, err = agent.communicate(timeout=300)  # the workers hold the pipes until they exit
    rows = _metrics_rows(run_dir)
    assert 3 <= rows < 400
    assert f"stopped by the end of its launcher (torchrun, pid {agent.pid}) after step {rows}" in out, err[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{rows:08d}"]
    assert (run_dir / "checkpoints" / f"step_{rows:08d}" / "COMPLETE").is_file()
    from moetron.checkpoint.run_lock import holder_of
    assert holder_of(run_dir) is None

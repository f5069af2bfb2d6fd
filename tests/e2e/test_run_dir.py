"""All ranks of a job write into one run directory, even when Hydra's default folder (named after
the second each process started) differs between them: rank 0 decides, the others follow."""
import os
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

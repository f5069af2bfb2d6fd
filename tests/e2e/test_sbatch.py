"""launch/slurm/train.sbatch as SLURM runs it, with stand-ins for srun and scontrol: the job trains,
and USR1 before the time limit (what --signal=B:USR1@300 sends the script) checkpoints every rank
and requeues the job."""
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.test_faults import _wait_for_steps
from tests.e2e.test_train_cli import FAST, read_metrics

REPO = Path(__file__).resolve().parents[2]
SRUN = """#!/usr/bin/env bash
# one task: drop srun's options, run the command as task 0 of 1 (srun passes signals on; exec keeps that)
while [[ "$1" == --* ]]; do shift; done
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; else echo "$@" >> "$SCONTROL_LOG"; fi
"""


def _job(tmp_path, args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    python_dir = Path(sys.executable).parent  # `python` in the script is this interpreter
    env = {**os.environ, "PATH": f"{bin_dir}:{python_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node001", "SLURM_NNODES": "1", "SLURM_NTASKS": "1",
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(["bash", str(REPO / "launch/slurm/train.sbatch"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_batch_script_trains_and_requeues_on_the_time_limit_signal(tmp_path):
    run_dir = tmp_path / "run"
    job = _job(tmp_path, ["model=tiny", "train.max_steps=400", "train.ckpt_every=1000", *FAST,
                          f"hydra.run.dir={run_dir}"])
    _wait_for_steps(run_dir, 3, [job])
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-2000:]
    stopped = len(read_metrics(run_dir))
    assert 3 <= stopped < 400
    assert "stopped by SIGUSR1" in out and "requeueing job 4242" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{stopped:08d}"]

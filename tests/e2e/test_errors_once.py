"""A bad setting is said once, in one process, before any rank starts: through launch/train.sh
(which runs `moetron-train --check` before torchrun), and from ranks that torchrun started directly
(only rank 0 speaks)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("override, says", [
    ("train.max_step=3", "moetron-train: error: train.max_step is not a setting: did you mean train.max_steps?"),
    ("parallel.ep=4", "world size 4 != parallel.pp*parallel.dp*parallel.ep = 2*1*4: launch 8 ranks or change"),
])
def test_the_launch_script_says_a_bad_setting_once_and_starts_no_rank(tmp_path, override, says):
    run_dir = tmp_path / "run"
    proc = subprocess.run(["bash", "launch/train.sh", override, f"hydra.run.dir={run_dir}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert says in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr + proc.stdout
    first, *problems = proc.stderr.strip().splitlines()
    assert first.startswith("moetron-train: error:") and all(p.startswith("  ") for p in problems), proc.stderr
    assert not run_dir.exists()  # no rank, not even Hydra, started


def test_ranks_started_by_torchrun_say_a_misspelled_key_once(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "moetron.train", "optim.lrr=1e-3", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("moetron-train: error: optim.lrr is not a setting: did you mean optim.lr?") == 1
    assert "Set the environment variable HYDRA_FULL_ERROR" not in proc.stderr  # Hydra's own message: not per rank

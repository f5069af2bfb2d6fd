"""A Hydra sweep submitted as jobs through Hydra's submitit launcher, as `hydra/launcher=submitit_slurm`
does on a cluster; `submitit_local` runs the same path here. Each job's ranks come from submitit's
job environment (SLURM's variables under SLURM) and meet at the job's first host."""
import json
import os
import subprocess
import sys

from moetron.train.distributed import first_host, job_rendezvous
from tests.e2e.test_train_cli import FAST


def test_a_sweep_runs_as_jobs_of_two_ranks_each(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moetron.train", "-m", "hydra/launcher=submitit_local",
                           "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", "model=tiny",
                           "parallel.ep=2", "train.max_steps=3", *FAST, "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        metrics = [json.loads(line) for line in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_0_log.out"))
    assert logs.count("placement: pp=1 dp=1 ep=2 on 1 node(s) x 2 rank(s)") == 2  # both jobs, two ranks each
    lrs = sorted(json.loads((sweep / job / "metrics.jsonl").read_text().splitlines()[0])["lr"] for job in "01")
    assert lrs[0] < lrs[1]  # the sweep's two learning rates


def test_slurm_jobs_meet_at_their_first_host_on_a_port_of_their_own():
    assert first_host("gpu[003-010,012],cpu1") == "gpu003"
    assert first_host("node7,node8") == "node7"
    assert first_host("a-b[09]") == "a-b09"
    assert first_host("rack[1-2]-node[01-04],x") == "rack1-node01" and first_host("node[1-4]-ib") == "node1-ib"
    env = {"SLURM_JOB_NODELIST": "h100-[0017-0020]", "SLURM_JOB_ID": "123456"}
    assert job_rendezvous(env) == ("h100-0017", str(20000 + 123456 % 10000))
    assert job_rendezvous({}) is None

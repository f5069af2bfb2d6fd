"""moetron-report on a real pipelined run with logging.timeline=true: the measured timeline holds
every action of each rank's schedule, and the page shows it next to the simulated one."""
from moetron.pipeline.builders import build_schedule
from moetron.pipeline.timeline import load_timelines
from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import FAST, run_cli


def test_a_pipelined_runs_report_draws_its_measured_step(tmp_path):
    run = tmp_path / "run"
    torchrun(2, ["model=tiny", "parallel.pp=2", "parallel.schedule=dualpipe", "train.max_steps=3", *FAST,
                 "train.micro_batch=1", "logging.timeline=true", "logging.timeline_step=2", f"hydra.run.dir={run}"],
             tmp_path)
    head, spans = load_timelines(run / "timeline")
    assert head["step"] == 2 and head["pp"] == 2 and head["microbatches"] == 8
    sched = build_schedule("dualpipe", 2, 8)
    assert [[a for a, _, _ in row] for row in spans] == sched.actions  # every action, in each rank's order
    assert all(0 <= start <= end for row in spans for _, start, end in row)
    proc = run_cli([str(run)], tmp_path, module="moetron.report.cli", check=False)
    assert proc.returncode == 0, proc.stderr
    page = (run / "report" / "index.html").read_text()
    for name in ("timeline_measured.png", "timeline_simulated.png", "experts_run.png", "bubble.png", "bias.png"):
        assert f'src="{name}"' in page and (run / "report" / name).stat().st_size > 5_000
    proc = run_cli([str(tmp_path / "nothing")], tmp_path, module="moetron.report.cli", check=False)
    assert proc.returncode == 2 and "give the run directory of a moetron-train run" in proc.stderr

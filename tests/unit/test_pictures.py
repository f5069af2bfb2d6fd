"""Pictures are checked by what they draw: the boxes of a timeline are the schedule's actions, a
heatmap's rows are the logged tokens per expert, a chart's bars add up to the step."""
import json

import pytest
from matplotlib import image

from moetron.pipeline.builders import build_schedule
from moetron.pipeline.simulate import Costs, main as simulate_main, simulate
from moetron.pipeline.timeline import draw_timeline
from moetron.report import figures
from moetron.report.cli import build_report


def _png_size(path):
    height, width = image.imread(path).shape[:2]
    return width, height


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_a_simulated_timeline_draws_one_box_per_action(tmp_path, name):
    sched = build_schedule(name, 4, 8)
    result = simulate(sched, Costs(1.0, 1.0, 1.0, 2.5))
    path, boxes = draw_timeline(result.spans, sched, tmp_path / f"{name}.png", name)
    assert boxes == sum(len(row) for row in sched.actions)
    assert [[a for a, _, _ in row] for row in result.spans] == sched.actions  # each rank's own order
    width, height = _png_size(path)
    assert width > 600 and height > 200


def test_simulate_plot_writes_the_chart(tmp_path, capsys):
    assert simulate_main(["--schedule", "dualpipe", "--pp", "4", "--microbatches", "8", "--plot",
                          str(tmp_path / "dp.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bubble_ratio"] > 0 and (tmp_path / "dp.png").stat().st_size > 10_000


def _records():
    loads = {1: [[10, 20, 30, 40], [25, 25, 25, 25]], 2: [[1, 2, 3, 94], [50, 0, 0, 50]]}
    out = []
    for i in range(2):
        r = {"step": i + 1, "loss": 5.0 - i, "loss/lm": 4.5 - i, "loss/mtp": 4.8 - i, "loss/seq_aux": 1e-3,
             "throughput/tokens_per_s": 1000.0 + i, "throughput/mfu": 0.01, "moe/maxvio_batch": 0.5,
             "pipeline/bubble_ratio": 0.1}
        for layer, rows in loads.items():
            r[f"moe/load/layer_{layer}"] = rows[i]
            r[f"moe/maxvio_batch/layer_{layer}"] = 0.1 * layer
            r[f"moe/bias/layer_{layer}"] = [0.001 * layer, -0.001, 0.0, 0.002]
        out.append(r)
    return out


def test_the_heatmaps_rows_are_the_logged_tokens_per_expert(tmp_path):
    records = _records()
    layers, at_step = figures.load_matrix(records, 2)
    assert layers == [1, 2] and at_step == [[25, 25, 25, 25], [50, 0, 0, 50]]
    _, whole = figures.load_matrix(records)
    assert whole == [[35, 45, 55, 65], [51, 2, 3, 144]]
    assert [sum(row) for row in whole] == [sum(sum(r[f"moe/load/layer_{i}"]) for r in records) for i in (1, 2)]
    path = figures.heatmap(layers, whole, tmp_path / "h.png", "t")
    assert _png_size(path)[0] > 300
    with pytest.raises(ValueError, match="step 7 was not logged"):
        figures.load_matrix(records, 7)


def test_the_report_page_shows_every_figure_of_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _records()) + "\n{\"step\": 3, \"lo")
    index = build_report(run, steps=[1])
    page = index.read_text()
    names = ["losses.png", "throughput.png", "maxvio.png", "experts_step1.png", "experts_run.png", "bias.png",
             "bubble.png"]
    for name in names:
        assert f'src="{name}"' in page and (run / "report" / name).stat().st_size > 5_000
    assert figures.bias(_records(), tmp_path / "b.png") == {1: [0.001, -0.001, 0.0, 0.002], 2: [0.002, -0.001, 0.0, 0.002]}
    assert figures.losses(_records(), tmp_path / "l.png")["loss/mtp"] == [4.8, 3.8]


def test_the_planner_chart_splits_each_step(tmp_path, capsys):
    from moetron.plan.chart import step_parts
    from moetron.plan.cli import main as plan_main

    assert plan_main(["model=mini", "cluster=h200_8", "train.seq_len=2048", "train.global_batch=64", "plan.top=4",
                      "--plot", str(tmp_path / "plan.png"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    from moetron.plan.estimate import Estimate, Layout
    for cand in out["candidates"]:
        e = Estimate(**{**cand, "layout": Layout(**cand["layout"])})
        assert sum(step_parts(e)) == pytest.approx(e.step_time_s)

"""logging.profile: a trace of the chosen steps, both halves of an F&B pair in it; bad settings named."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from moetron.pipeline.builders import build_schedule
from moetron.pipeline.runtime import PipelineRunner
from moetron.profiling import StepProfiler, all_threads_config, label
from moetron.train.config import RootConfig
from moetron.train.validate import validate

ROWS, HIDDEN = 4, 16


def _settings(**kw):
    return SimpleNamespace(**{"enabled": True, "start_step": 2, "num_steps": 2, "ranks": [0], **kw})


def _one_rank_dualpipev(n=4):
    torch.manual_seed(0)
    sched = build_schedule("dualpipev", 1, n)
    chunks = {s: nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()) for s in (0, 1)}
    runner = PipelineRunner(sched, 0, chunks, None, (ROWS, HIDDEN))
    data = {mb: torch.randn(ROWS, HIDDEN) for mb in range(n)}
    return lambda: runner.step(data, data, F.mse_loss)


def test_trace_of_the_chosen_steps_holds_both_halves_of_each_pair(tmp_path):
    step_fn = _one_rank_dualpipev()
    profiler = StepProfiler(_settings(), 0, tmp_path, torch.device("cpu"))
    written = {}
    for step in range(1, 5):
        profiler.begin(step)
        step_fn()
        written[step] = profiler.end(step)
    trace = tmp_path / "profile" / "rank0-steps2-3.json"
    assert written == {1: None, 2: None, 3: trace, 4: None}
    assert sorted(p.name for p in trace.parent.iterdir()) == [trace.name]  # no temporary left behind
    events = json.loads(trace.read_text())["traceEvents"]
    threads = {}
    for e in events:
        label = e.get("name", "").split(" ")[0]
        if label.startswith("pipeline."):
            threads.setdefault(label, set()).add(e["tid"])
    assert {"pipeline.F", "pipeline.FB", "pipeline.FB.forward"} <= set(threads)
    if all_threads_config() is not None:  # the side thread's backward is in the trace, on its own thread
        assert threads["pipeline.FB.backward"].isdisjoint(threads["pipeline.FB.forward"])
    pairs = sum(a.kind == "FB" for a in build_schedule("dualpipev", 1, 4).actions[0])
    assert sum(1 for e in events if e.get("name", "").startswith("pipeline.FB.forward")) == 2 * pairs  # 2 steps


def test_other_ranks_and_cut_short_windows_write_nothing(tmp_path):
    step_fn = _one_rank_dualpipev()
    other = StepProfiler(_settings(ranks=[1]), 0, tmp_path, torch.device("cpu"))
    cut = StepProfiler(_settings(num_steps=3), 0, tmp_path, torch.device("cpu"))
    for step in (1, 2, 3):
        for profiler in (other, cut):
            profiler.begin(step)
        step_fn()
        assert other.end(step) is None and cut.end(step) is None
    cut.close()  # the run stopped at step 3, before the window's end
    assert not (tmp_path / "profile").exists()
    every_rank = StepProfiler(_settings(ranks=[]), 5, tmp_path, torch.device("cpu"))
    assert every_rank.active and every_rank.path.name == "rank5-steps2-3.json"
    one_step = StepProfiler(_settings(num_steps=1), 0, tmp_path, torch.device("cpu"))
    assert (one_step.steps, one_step.path.name) == ("step 2", "rank0-step2.json")


@pytest.mark.parametrize("change,message", [
    ({"ranks": [0, 5]}, r"logging.profile.ranks has \[5\], outside the 4 rank\(s\) of this run"),
    ({"start_step": 199, "num_steps": 3}, r"steps 199-201 run past train.max_steps=200"),
    ({"num_steps": 0}, r"logging.profile.start_step=3 and logging.profile.num_steps=0 must be >= 1"),
])
def test_bad_profile_settings_name_the_key(change, message):
    cfg = OmegaConf.structured(RootConfig)
    cfg.model = {"arch": "deepseek_v3"}  # the model group's preset, as Hydra composes it
    cfg.train.global_batch = 32  # 8 sequences on each of the 4 ranks
    cfg.logging.profile.enabled = True
    for key, value in change.items():
        cfg.logging.profile[key] = value
    with pytest.raises(ValueError, match=message):
        validate(cfg, 4)
    cfg.logging.profile.enabled = False  # not profiling: the settings are not checked
    validate(cfg, 4)


def test_labels_cost_nothing_without_a_profiler():
    assert type(label("moe.dispatch")).__name__ == "nullcontext"  # no record_function op entered
    with torch.profiler.profile() as prof:
        with label("moe.dispatch"):
            torch.ones(2).sum()
    assert "moe.dispatch" in {e.name for e in prof.events()}

"""Pipeline schedules as data, checked and costed by the simulator against the DualPipe table
(reference/deepseek-v3.md section 1; F forward, B full backward, W weight backward, F&B an
overlapped pair)."""
import json
import subprocess
import sys

import pytest

from moetron.pipeline.builders import BUILDERS, MinimumMicrobatches, build_schedule
from moetron.pipeline.schedule import TRANSFER_KINDS, Action, Schedule, ScheduleError
from moetron.pipeline.simulate import Costs, simulate
from moetron.pipeline.transfers import check_transfers, with_transfers

# (f, b_input, w, f&b); the DualPipe row of the table assumes a forward costs what an input
# backward costs (f == b_input): under that premise the simulator must match it exactly.
COSTS = [(1.0, 1.0, 1.0, 2.0), (1.0, 1.0, 0.5, 2.5), (2.0, 2.0, 1.0, 3.0), (1.0, 1.0, 0.25, 1.7)]
GENERAL_COSTS = COSTS + [(1.0, 2.0, 1.0, 3.0), (2.0, 3.0, 0.5, 4.0)]


def table_row(name: str, pp: int, f: float, b_in: float, w: float, fb: float) -> tuple[float, int]:
    """(bubble, activations) of the DualPipe README table, with B the full backward."""
    b = b_in + w
    return {"1f1b": ((pp - 1) * (f + b), pp), "zb1p": ((pp - 1) * (f + b - 2 * w), pp),
            "dualpipe": ((pp / 2 - 1) * (fb + b - 3 * w), pp + 1),
            "dualpipev": ((pp / 2 - 1) * (fb + b - 3 * w), pp + 1)}[name]


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
@pytest.mark.parametrize("costs", GENERAL_COSTS)
def test_1f1b_and_zb1p_match_the_table_on_every_rank(name, pp, costs):
    for n in (pp, 2 * pp + 3):
        result = simulate(build_schedule(name, pp, n), Costs(*costs))
        bubble, activations = table_row(name, pp, *costs)
        assert result.bubble == pytest.approx([bubble] * pp)
        assert max(result.peak_activations) == activations


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
@pytest.mark.parametrize("costs", COSTS)
def test_dualpipe_and_dualpipev_match_the_table(name, pp, costs):
    ranks = pp if name == "dualpipe" else pp // 2  # DualPipeV: PP stages on PP/2 devices
    for n in (2 * pp, 2 * pp + 6):
        result = simulate(build_schedule(name, ranks, n), Costs(*costs))
        bubble, activations = table_row(name, pp, *costs)
        print(f"{name} PP={pp} N={n} costs={costs}: bubble {max(result.bubble):.3f} (table {bubble:.3f}), "
              f"activations {max(result.peak_activations)} (table {activations})")
        assert max(result.bubble) == pytest.approx(bubble)  # the worst rank's idle time
        assert result.peak_activations == [activations] * ranks


def test_dualpipe_is_symmetric_and_beats_1f1b():
    costs = Costs(1.0, 1.0, 0.5, 2.0)
    dual = simulate(build_schedule("dualpipe", 8, 16), costs)
    assert dual.bubble == pytest.approx(dual.bubble[::-1])
    assert max(dual.bubble) < min(simulate(build_schedule("1f1b", 8, 16), costs).bubble)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("pp", [2, 4])
def test_every_schedule_is_valid_with_minimum_and_more_microbatches(name, pp):
    minimum = 2 * pp if name in ("dualpipe", "dualpipev") else pp
    for n in (minimum, minimum + pp * 2):
        sched = build_schedule(name, pp, n)
        simulate(sched, Costs(1.0, 1.0, 1.0, 2.0, comm=0.1))  # raises on a deadlock or a missing action
        assert len(sched.actions) == pp
        lowered = with_transfers(sched)
        check_transfers(sched, lowered)  # every send has its receive, in the same order at both ends
        for rank, acts in enumerate(lowered):
            assert [a for a in acts if a.kind not in TRANSFER_KINDS] == sched.actions[rank]


@pytest.mark.parametrize("name,pp,n,message", [("dualpipe", 4, 6, "at least 8"), ("dualpipe", 3, 12, "even number of ranks"),
                                               ("dualpipev", 4, 7, "at least 8"), ("interleaved_1f1b", 4, 6, "multiple of 4")])
def test_too_few_microbatches_get_a_clear_error(name, pp, n, message):
    with pytest.raises(MinimumMicrobatches, match=message):
        build_schedule(name, pp, n)


def _two_ranks(actions):
    return Schedule("hand", 2, 1, chains=[[0, 1]], rank_of_stage={0: 0, 1: 1}, chain_of_mb=[0], actions=actions)


def test_validator_finds_deadlocks_and_missing_or_misplaced_work():
    ok = [[Action("F", 0, 0), Action("BW", 0, 0)], [Action("F", 0, 1), Action("BW", 0, 1)]]
    simulate(_two_ranks(ok), Costs())
    with pytest.raises(ScheduleError, match="deadlock"):  # rank 0 waits for a gradient before its forward
        simulate(_two_ranks([[Action("BW", 0, 0), Action("F", 0, 0)], ok[1]]), Costs())
    with pytest.raises(ScheduleError, match="appears 0 times"):
        simulate(_two_ranks([[Action("F", 0, 0)], ok[1]]), Costs())
    with pytest.raises(ScheduleError, match="runs on rank 1"):
        simulate(_two_ranks([[Action("F", 0, 0), Action("BW", 0, 0), Action("F", 0, 1)], ok[1]]), Costs())


def test_transfers_are_explicit_and_checked():
    sched = _two_ranks([[Action("F", 0, 0), Action("BW", 0, 0)], [Action("F", 0, 1), Action("BW", 0, 1)]])
    lowered = with_transfers(sched)
    assert [str(a) for a in lowered[0]] == ["RECV_B0.0", "F0.0", "SEND_F0.0", "BW0.0"]  # posted one action ahead
    assert [str(a) for a in lowered[1]] == ["RECV_F0.1", "F0.1", "BW0.1", "SEND_B0.1"]
    two = build_schedule("1f1b", 2, 4)
    lowered = with_transfers(two)
    receives = [i for i, a in enumerate(lowered[1]) if a.kind == "RECV_F"]
    lowered[1][receives[0]], lowered[1][receives[1]] = lowered[1][receives[1]], lowered[1][receives[0]]
    with pytest.raises(ScheduleError, match="rank 0 sends F transfers to rank 1 in the order"):
        check_transfers(two, lowered)
    del lowered[1][receives[0]]
    with pytest.raises(ScheduleError, match="but rank 1 receives"):
        check_transfers(two, lowered)


def test_simulate_cli_prints_one_json_object():
    proc = subprocess.run([sys.executable, "-m", "moetron.pipeline.simulate", "--schedule", "dualpipev", "--pp", "4",
                           "--microbatches", "8", "--f", "1", "--b", "1", "--w", "0.5", "--fb", "2", "--json"],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    assert set(result) == {"makespan", "bubble", "bubble_ratio", "peak_activations"}
    assert len(result["bubble"]) == 4 and result["peak_activations"] == [9] * 4

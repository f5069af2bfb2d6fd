"""The lanes' issue order (moetron.comm.lanes.IssueOrder): while an F&B pair runs, the forward and
backward take turns issuing collectives, lane 0 first, whatever either thread's timing; a lane that
is done leaves and the other goes on alone; outside a pair nothing waits."""
import random
import threading

import pytest

from moetron.comm.lanes import IssueOrder


def _interleaved(n0: int, n1: int) -> list[int]:
    """Turns alternate from lane 0 while both lanes have collectives left, then the rest in a row."""
    both = min(n0, n1)
    return [0, 1] * both + [0] * (n0 - both) + [1] * (n1 - both)


def _run_pair(order: IssueOrder, counts: tuple[int, int], seed: int) -> list[int]:
    """Two threads, one per lane, issue counts[lane] collectives with random compute between them."""
    issued, inside, together = [], [], []
    rng = {lane: random.Random(seed * 10 + lane) for lane in (0, 1)}

    def lane_main(lane: int) -> None:
        try:
            for _ in range(counts[lane]):
                threading.Event().wait(rng[lane].random() * 0.004)  # compute before the collective
                with order.turn(lane):
                    inside.append(lane)
                    together.append(len(inside) > 1)
                    threading.Event().wait(rng[lane].random() * 0.001)
                    issued.append(lane)
                    inside.remove(lane)
            threading.Event().wait(rng[lane].random() * 0.004)  # compute after the last one
        finally:
            order.leave(lane)

    with order.pair():
        side = threading.Thread(target=lane_main, args=(1,))
        side.start()
        lane_main(0)
        side.join(timeout=30)
        assert not side.is_alive(), "the pair deadlocked"
    assert not any(together), "two lanes issued at once"
    return issued


@pytest.mark.parametrize("counts", [(4, 4), (6, 2), (2, 6), (0, 3), (3, 0), (1, 1)])
def test_a_pair_issues_in_the_same_order_whatever_the_timing(counts):
    order = IssueOrder()
    for seed in range(8):
        assert _run_pair(order, counts, seed) == _interleaved(*counts), seed


def test_outside_a_pair_no_lane_waits():
    order = IssueOrder()
    for lane in (1, 1, 0, 0, 1):
        with order.turn(lane):
            pass
    _run_pair(order, (2, 1), seed=0)  # a pair in between leaves no turn behind
    for lane in (1, 1, 0):
        with order.turn(lane):
            pass


def test_a_lane_that_fails_lets_the_other_finish():
    """The runner leaves a lane in `finally`: the backward's error must not strand the forward."""
    order = IssueOrder()
    issued = []

    def failing_backward() -> None:
        try:
            raise RuntimeError("backward failed before its first collective")
        finally:
            order.leave(1)

    raised = []

    def side_main() -> None:
        try:
            failing_backward()
        except RuntimeError as err:
            raised.append(err)

    with order.pair():
        side = threading.Thread(target=side_main)
        side.start()
        for _ in range(3):
            with order.turn(0):
                issued.append(0)
        order.leave(0)
        side.join(timeout=30)
    assert issued == [0, 0, 0] and len(raised) == 1


def test_a_turn_that_never_comes_is_an_error_not_a_hang():
    order = IssueOrder(timeout_s=0.2)
    with order.pair():
        with order.turn(0):
            pass
        with pytest.raises(RuntimeError, match="lane 0 waited 0 s for its turn.*lane 1 of this F&B pair"):
            with order.turn(0):  # lane 1 never issues nor leaves
                pass

"""When a pipeline rank's gradients are final: after the stage's last action that adds each kind of
gradient (B or a full backward for most, W for deferred weight gradients), and after the later of
two stages holding a parameter."""
from moetron.pipeline.builders import build_schedule
from moetron.pipeline.grads_final import final_gradient_actions, gradient_order
from moetron.pipeline.schedule import ActionKind as K


def _last(actions, kinds, stage):
    return max(i for i, a in enumerate(actions) if a.kind in kinds and (a.stage2 if a.kind == K.FB else a.stage) == stage)


def test_zb1p_plain_gradients_after_the_last_b_deferred_ones_after_the_last_w():
    sched = build_schedule("zb1p", 2, 4)
    actions = sched.actions[0]
    plain, deferred = object(), object()  # parameters stand-ins: only their identity counts
    final = final_gradient_actions(actions, {0: [plain, deferred]}, {id(deferred)})
    assert final == {_last(actions, (K.B, K.BW), 0): [plain], _last(actions, (K.W, K.BW), 0): [deferred]}
    assert _last(actions, (K.B,), 0) < _last(actions, (K.W,), 0)  # the W's lag behind
    assert gradient_order(actions, {0: [plain, deferred]}, {id(deferred)}) == [plain, deferred]


def test_a_parameter_two_stages_hold_is_final_after_the_later_one():
    sched = build_schedule("dualpipev", 2, 4)
    stages = sched.stages_on(0)
    actions = sched.actions[0]
    shared, first_only, last_only = object(), object(), object()
    stage_params = {stages[0]: [first_only, shared], stages[1]: [last_only, shared]}
    final = final_gradient_actions(actions, stage_params, set())
    ends = {s: _last(actions, (K.B, K.BW, K.FB), s) for s in stages}
    assert ends[stages[0]] != ends[stages[1]]
    where = {id(p): i for i, params in final.items() for p in params}
    assert where == {id(first_only): ends[stages[0]], id(last_only): ends[stages[1]],
                     id(shared): max(ends.values())}
    assert sum(len(v) for v in final.values()) == 3  # each parameter final once

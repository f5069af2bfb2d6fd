"""GRPO as a user runs it: `moetron-train stage=grpo`. Each completion draws from a generator of its
own (train.seed, the step, its index in the global batch), so one process, two data ranks and EP=2
sample the same rollouts and take the same steps; a stopped run resumes bitwise (checkpoints fall
between rollouts; the reference model travels in them); a reward function that fails stops the run
naming it."""
import pytest

from moetron.checkpoint import dcp_io
from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli

STEPS = 3
GRPO = ["model=tiny", "stage=grpo", f"train.max_steps={STEPS}", "rl.group_size=4", "rl.prompts_per_step=4",
        "rl.max_new_tokens=6", "rl.reward=tests.fakes.rewards:checksum", "optim.lr=1e-3", "train.micro_batch=4",
        "logging.progress=false", "logging.wandb.mode=disabled"]
COMPARED = ("loss", "rl/reward_mean", "rl/kl", "rl/ratio_mean", "rl/clip_fraction", "rl/entropy", "grad_norm")


def _run(tmp_path, name, *extra, ranks=1, check=True):
    args = [*GRPO, f"hydra.run.dir={tmp_path / name}", *extra]
    proc = run_cli(args, tmp_path, check=check) if ranks == 1 else torchrun(ranks, args, tmp_path)
    return proc


def test_every_layout_takes_the_same_grpo_steps(tmp_path):
    extra = ["rl.beta=0.04", "rl.inner_steps=2"]  # a reference model, and a second pass off the sampling policy
    _run(tmp_path, "one", *extra)
    reference = read_metrics(tmp_path / "one")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert reference[0]["rl/reward_std"] > 0 and reference[0]["rl/no_signal_fraction"] < 1  # a signal to learn
    assert reference[-1]["rl/kl"] > 0
    assert reference[0]["moe/rollout_vs_train"] == 0.0  # routing replay: the same experts as while sampling
    for name, layout in {"dp2": [], "ep2": ["parallel.ep=2"]}.items():
        _run(tmp_path, name, *extra, *layout, ranks=2)
        for a, b in zip(reference, read_metrics(tmp_path / name), strict=True):
            for key in COMPARED:  # float32; ranks and expert shards sum in other orders
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (name, a["step"], key)
            assert b["tokens"] == a["tokens"] and b["rl/response_length"] == a["rl/response_length"]


def test_a_stopped_grpo_run_resumes_bitwise(tmp_path):
    extra = ["rl.beta=0.04", "train.ckpt_every=1"]
    _run(tmp_path, "whole", *extra)
    _run(tmp_path, "parts", *extra, "train.exit_after_steps=1")
    proc = _run(tmp_path, "parts", *extra)
    assert "resuming" in proc.stdout
    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    assert whole[0]["rl/kl"] == 0.0 and whole[-1]["rl/kl"] > 0  # step 1's policy is the reference
    assert whole[0]["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # and the sampler (routes replayed)
    assert [r["step"] for r in parts] == list(range(1, STEPS + 1))
    for a, b in zip(whole, parts, strict=True):
        for key in (*COMPARED, "rl/response_length", "tokens"):
            assert b[key] == a[key], (a["step"], key)
    step = f"checkpoints/step_{STEPS:08d}"
    expected, got = dcp_io.load_whole(tmp_path / "whole" / step, ""), dcp_io.load_whole(tmp_path / "parts" / step, "")
    assert set(got) == set(expected) and any(k.startswith("ref/") for k in got)  # the reference model travels
    for name, tensor in expected.items():
        assert bool((got[name] == tensor).all()), name


@pytest.mark.parametrize("fn,says", [("raises", "raised KeyError: 'no such answer'"),
                                     ("too_few", "returned 0 rewards for 1 completions"),
                                     ("nan", "reward nan for completion 0")])
def test_a_reward_function_that_fails_stops_the_run_naming_it(tmp_path, fn, says):
    """Tried on the first example before any process group starts (the unit tests hold the same
    checks on every rollout's scores)."""
    proc = _run(tmp_path, fn, f"rl.reward=tests.fakes.rewards:{fn}", check=False)
    assert proc.returncode != 0
    assert f"rl.reward=tests.fakes.rewards:{fn}: {says}" in proc.stderr
    assert not (tmp_path / fn / "checkpoints").exists() or not any((tmp_path / fn / "checkpoints").iterdir())

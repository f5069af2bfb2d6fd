"""Context parallelism through `moetron-train parallel.cp=N` (issue 29): each sequence split over
cp ranks trains as one process does over 8 steps, with MTP (DeepSeek-V3) and for a GQA family
(Qwen3-MoE), alone and with expert parallelism or a DualPipeV pipeline; a run resumes with another
cp. Every gradient of one step against one process: tests/dist/test_context_parallel.py."""
import pytest

from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli

RUN = ["train.max_steps=8", "train.seq_len=64", "train.global_batch=4", "train.micro_batch=2",
       "logging.progress=false", "train.eval_every=4"]


def _assert_same_run(reference, other, name):
    """Loss terms, gradient norm and validation loss at every step: 1e-5 relative (float32; attention's keys and the
    balance statistics are summed in another order over the ranks: 5e-7 at most where measured),
    while the experts' loads are the same. A router's near-tie can flip with the last bit of its
    input (seen once, Qwen3-MoE at cp=4: one token of 512 moved to another expert at step 8); from
    such a step on the runs may part, so it must move one token at most, and come late."""
    ref, got = read_metrics(reference), read_metrics(other)
    assert [r["step"] for r in got] == list(range(1, 9)), name
    loads = [k for k in ref[0] if k.startswith("moe/load/")]
    assert loads and "eval/loss" in ref[3]  # the validation loss, as the training loss, under cp
    for a, b in zip(ref, got, strict=True):
        moved = [sum(abs(x - y) for x, y in zip(a[k], b[k])) for k in loads]
        if any(moved):
            assert max(moved) <= 2 and a["step"] >= 6, (name, a["step"], moved)
            break
        for key in ("loss", "loss/lm", "loss/mtp", "loss/aux", "grad_norm", "eval/loss", "eval/loss/mtp"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (name, key, a["step"])
        assert b["tokens"] == a["tokens"]


@pytest.mark.parametrize("preset,layouts", [
    ("tiny", {"cp2": (2, ["parallel.cp=2"]), "cp4": (4, ["parallel.cp=4"]),
              "cp2_ep2": (4, ["parallel.cp=2", "parallel.ep=2"]),
              "cp2_dualpipev": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.schedule=dualpipev",
                                    "train.micro_batch=1"])}),
    ("qwen3_moe_tiny", {"cp2": (2, ["parallel.cp=2"]), "cp4": (4, ["parallel.cp=4"])}),
])
def test_context_parallel_layouts_train_as_one_process(preset, layouts, tmp_path):
    args = [f"model={preset}", *RUN]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    for name, (nproc, layout) in layouts.items():
        proc = torchrun(nproc, [*args, *layout, f"hydra.run.dir={tmp_path / name}"], tmp_path)
        assert f"cp={layout[0].split('=')[1]}" in proc.stdout.splitlines()[0], proc.stdout[:300]
        _assert_same_run(tmp_path / "one", tmp_path / name, name)


def test_a_run_resumes_with_another_cp(tmp_path):
    """Checkpoints hold nothing of context parallelism: 4 steps at cp=2, then 4 at cp=4 (experts
    sharded over 2, then 4 ranks), train as one uninterrupted process does."""
    args = ["model=tiny", *RUN, "train.ckpt_every=4"]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    for nproc in (2, 4):
        leg = [f"parallel.cp={nproc}", "train.exit_after_steps=4", f"hydra.run.dir={tmp_path / 'moved'}"]
        torchrun(nproc, [*args, *leg], tmp_path)
    _assert_same_run(tmp_path / "one", tmp_path / "moved", "cp2 -> cp4")

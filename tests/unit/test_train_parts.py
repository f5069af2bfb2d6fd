"""Pieces of the trainer: sampler, schedules, optimizer, checkpoints, token files."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moetron.checkpoint import folders as checkpoint
from moetron.data.windows import BatchSampler, load_source
from moetron.data.token_files import open_token_file, write_token_file
from moetron.data.tokenizers import ByteTokenizer
from moetron.models.spec import piecewise
from moetron.train.lr_schedule import lr_at, schedule_problems
from moetron.train.optim import AdamWLowPrecisionMoments


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "MoE ✓ — DeepSeek"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 257 and tok.eos_id == 256


def test_builtin_corpus_is_a_few_megabytes_of_text():
    tokens = load_source("builtin", ByteTokenizer()).tokens
    assert 1_000_000 < len(tokens) < 5_000_000
    assert (tokens == 256).sum() > 100  # documents separated by EOS


def test_sampler_is_deterministic_sharded_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = BatchSampler.of_tokens(tokens, seq_len=10, seed=3)
    windows = sampler.blend.parts[0]
    whole = [x for x, _ in sampler.micro_batches(first_sample=56, global_batch=8, micro_batch=4, dp_rank=0, dp=1)]
    halves = [x for r in (0, 1) for x, _ in BatchSampler.of_tokens(tokens, 10, 3).micro_batches(56, 8, 2, r, 2)]
    assert torch.equal(torch.cat(whole), torch.cat(halves))  # DP ranks split the same global batch
    x, y = next(sampler.micro_batches(0, 8, 8, 0, 1))
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one
    assert all(int(row[0]) % 10 == 0 for row in x)  # windows start every seq_len tokens (packing)
    epoch0 = [int(windows.window(i)[0]) for i in range(windows.num_windows)]
    assert sorted(epoch0) == list(range(0, 990, 10))  # each window once per epoch
    assert epoch0 != [int(windows.window(i + windows.num_windows)[0]) for i in range(windows.num_windows)]


def test_lr_warmup_then_cosine_to_its_own_horizon():
    cfg = SimpleNamespace(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_steps=110, schedule=None)
    assert lr_at(0, 0, cfg) == pytest.approx(0.1)
    assert lr_at(9, 0, cfg) == pytest.approx(1.0)
    assert lr_at(60, 0, cfg) == pytest.approx(0.55)
    assert lr_at(110, 0, cfg) == pytest.approx(0.1)
    assert lr_at(170, 0, cfg) == pytest.approx(0.1)  # a run extended past its horizon stays at the floor


def test_the_reports_schedule_in_tokens():
    """DeepSeek-V3's: 2K warmup steps to 2.2e-4, constant to 10T tokens, cosine to 2.2e-5 over
    4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B (report section 4.2)."""
    from importlib import resources

    from omegaconf import OmegaConf

    cfg = OmegaConf.create(resources.files("moetron.conf").joinpath("optim", "deepseek_v3.yaml").read_text())
    phases = OmegaConf.to_container(cfg.schedule)
    assert schedule_problems(phases) == []
    assert lr_at(0, 0, cfg) == pytest.approx(2.2e-4 / 2000) and lr_at(1999, 0, cfg) == pytest.approx(2.2e-4)
    assert lr_at(5000, 9.9e12, cfg) == pytest.approx(2.2e-4)
    assert lr_at(5000, 12.15e12, cfg) == pytest.approx((2.2e-4 + 2.2e-5) / 2)  # half way down the cosine
    assert lr_at(5000, 14.5e12, cfg) == pytest.approx(2.2e-5) and lr_at(5000, 14.7e12, cfg) == pytest.approx(7.3e-6)
    assert lr_at(5000, 20e12, cfg) == pytest.approx(7.3e-6)
    assert schedule_problems([{"until_tokens": 5, "lr": 1.0}, {"until_tokens": 3, "lr": 1.0}])[0].startswith(
        "optim.schedule[1]")


def test_piecewise_schedule_in_tokens():
    schedule = [[0, 0.3], [10e12, 0.1]]
    assert piecewise(schedule, 0) == 0.3 and piecewise(schedule, 9.99e12) == 0.3 and piecewise(schedule, 10e12) == 0.1


def test_bf16_moments_track_torch_adamw():
    torch.manual_seed(0)
    w_ref = torch.nn.Parameter(torch.randn(64, 32))
    w_low = torch.nn.Parameter(w_ref.detach().clone())
    ref = torch.optim.AdamW([w_ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    low = AdamWLowPrecisionMoments([w_low], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(64, 32)
        w_ref.grad, w_low.grad = g.clone(), g.clone()
        ref.step()
        low.step()
    assert low.state[w_low]["exp_avg"].dtype == torch.bfloat16
    # BF16 moments keep 8 mantissa bits (relative rounding 2^-9 per store); after 20 steps of lr 1e-2
    # the parameters differ from float32 AdamW by far less than one step's size.
    assert (w_low - w_ref).abs().max() < 1e-3


def _load_latest(root, names):
    """The newest complete checkpoint whose parts all load, as the trainer looks for it."""
    for step, path in checkpoint.complete_dirs(root):
        try:
            return step, {name: checkpoint.load_part(path / f"{name}.pt") for name in names}
        except Exception as err:
            checkpoint.skip_corrupt(path, err)
    return None


def test_checkpoint_save_is_atomic_and_pruned(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        checkpoint.save(root, step, {"model": {"w": torch.tensor([step])}}, keep=2)
    assert [s for s, _ in checkpoint.step_dirs(root)] == [3, 2]
    real_save = torch.save

    def failing_save(obj, f):  # the process dies half way through writing step 4
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        checkpoint.save(root, 4, {"model": {"w": torch.tensor([4])}}, keep=2)
    monkeypatch.setattr(torch, "save", real_save)
    step, parts = _load_latest(root, ("model",))
    assert step == 3 and int(parts["model"]["w"]) == 3  # the half-written step 4 is invisible
    assert [s for s, _ in checkpoint.step_dirs(root)] == [3, 2]


def test_token_file_checks(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world")
    meta = write_token_file([src], tmp_path / "out" / "c", ByteTokenizer())
    assert meta["num_tokens"] == 12 and meta["num_documents"] == 1
    assert open_token_file(str(tmp_path / "out" / "c")).tokens.tolist()[-1] == 256
    (tmp_path / "out" / "c.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="corrupt data file"):
        open_token_file(str(tmp_path / "out" / "c"))
    with pytest.raises(FileNotFoundError, match="input file not found"):
        write_token_file([tmp_path / "nope.jsonl"], tmp_path / "x", ByteTokenizer())


class _RunsCode:
    """A pickle that runs a command when unpickled (what a checkpoint handed over by someone may hold)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_without_running(tmp_path):
    root, marker = tmp_path / "ckpt", tmp_path / "pwned"
    checkpoint.save(root, 1, {"trainer": {"step": 1, "rng": torch.get_rng_state()}}, keep=2)
    checkpoint.save(root, 2, {"trainer": {"step": 2}}, keep=2)
    torch.save({"step": 2, "payload": _RunsCode(marker)}, root / "step_00000002" / "trainer.pt")
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint .*step_00000002.*Unpickl"):
        step, parts = _load_latest(root, ("trainer",))
    assert not marker.exists()  # refused, not run
    assert step == 1 and parts["trainer"]["step"] == 1  # the previous complete checkpoint
    assert (root / "step_00000002").is_dir()  # left in place for the user to inspect


_KILLED_WRITER = """
import sys, time, torch
from pathlib import Path
from moetron.checkpoint import folders as checkpoint
root = Path(sys.argv[1])
real_save = torch.save
def slow_save(obj, f):  # the process is killed while its second file is half written
    real_save(obj, f)
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
checkpoint.save(root, 2, {"model": {"w": torch.tensor([2.0])}, "optim": {"s": torch.tensor([2.0])}}, keep=2)
"""


def test_a_writer_killed_with_sigkill_leaves_the_previous_checkpoint_the_newest(tmp_path):
    import signal
    import subprocess
    import sys

    root = tmp_path / "ckpt"
    checkpoint.save(root, 1, {"model": {"w": torch.tensor([1.0])}, "optim": {"s": torch.tensor([1.0])}}, keep=2)
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"  # inside the write of step 2
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    assert not (root / "step_00000002").exists()  # never renamed into place: nothing half-written is visible
    step, parts = _load_latest(root, ("model", "optim"))
    assert step == 1 and float(parts["model"]["w"]) == 1.0


def test_the_batch_ramp_grows_in_equal_token_shares():
    from moetron.train.batch_ramp import global_batch_at, ramp_batches, ramp_problems

    ramp = [3072, 768, 469e9]  # the report's 3072 -> 15360 over 469B tokens, in 16 increments
    assert global_batch_at(0, 15360, ramp) == 3072 and global_batch_at(469e9 / 16, 15360, ramp) == 3840
    assert global_batch_at(468e9, 15360, ramp) == 15360 - 768 and global_batch_at(469e9, 15360, ramp) == 15360
    assert global_batch_at(1e15, 15360, None) == 15360
    assert ramp_batches(16, [8, 4, 3000]) == [8, 12, 16] and ramp_problems(15360, ramp) == []
    assert "must be [start, increment, tokens]" in ramp_problems(16, [8, 4])[0]
    assert "increment > 0 dividing" in ramp_problems(16, [8, 3, 100])[0]


def test_the_parameter_average_blends_each_step_on_a_worker_and_swaps_in_for_evaluation():
    from moetron.train.ema import ParameterEMA

    model = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = ParameterEMA(model, decay=0.75)
    expected = {n: t.clone() for n, t in start.items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update()  # returns at once; the next update or any read waits for it
        expected = {n: 0.75 * expected[n] + 0.25 * p.detach() for n, p in model.named_parameters()}
    state = ema.state()
    assert sorted(state) == ["ema/bias", "ema/weight"]
    for name in ("weight", "bias"):
        torch.testing.assert_close(state[f"ema/{name}"], expected[name])
    trained = model.weight.detach().clone()
    with ema.swapped_in():
        torch.testing.assert_close(model.weight.detach(), expected["weight"])
    assert torch.equal(model.weight.detach(), trained)  # back after the block
    ema.close()

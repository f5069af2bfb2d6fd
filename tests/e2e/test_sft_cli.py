"""Supervised fine-tuning as a user runs it: `moetron-data --chat` on the shipped conversations, then
`moetron-train stage=sft`. The loss counts assistant tokens only, normalised over the whole global
batch's counted targets: every layout and micro-batch split gives the same losses (1 rank x 4
micro-batches, 1 x 2 larger ones, 2 data ranks, EP=2, PP=2 under DualPipeV, CP=2), and the first step's
loss is the hand-computed one."""
import pytest
import torch

from moetron.data.chat_sample import CONVERSATIONS
from moetron.data.cli import main as data_main
from moetron.data.tokenizers import ByteTokenizer
from moetron.data.windows import build_data
from moetron.models import get_spec, load_preset
from moetron.models.common.linear_cross_entropy import IGNORE_INDEX
from moetron.models.common.packed import PackedSamples
from moetron.train.config import DataConfig
from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli

SEQ, BATCH, STEPS = 256, 8, 3
SFT = ["model=tiny", "stage=sft", f"train.max_steps={STEPS}", f"train.seq_len={SEQ}",
       f"train.global_batch={BATCH}", "optim.lr=1e-3", "logging.progress=false", "data.valid_fraction=0.05",
       f"train.eval_every={STEPS}"]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("chat") / "chat"
    assert data_main([str(CONVERSATIONS), "--chat", "--output", str(prefix), "--workers", "1"]) == 0
    return prefix


def _run(tmp_path, name, chat, *extra, ranks=1):
    args = [*SFT, f"data.path={chat}", f"hydra.run.dir={tmp_path / name}", *extra]
    if ranks == 1:
        run_cli(args, tmp_path)
    else:
        torchrun(ranks, args, tmp_path)
    return read_metrics(tmp_path / name)


def test_every_layout_gives_the_same_sft_losses(tmp_path, chat):
    reference = _run(tmp_path, "one_rank_4_micro", chat, "train.micro_batch=2")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    layouts = {
        "one_rank_2_micro": _run(tmp_path, "one_rank_2_micro", chat, "train.micro_batch=4"),
        "dp2": _run(tmp_path, "dp2", chat, "train.micro_batch=2", ranks=2),
        "ep2": _run(tmp_path, "ep2", chat, "train.micro_batch=2", "parallel.ep=2", ranks=2),
        "pp2_dualpipev": _run(tmp_path, "pp2", chat, "train.micro_batch=2", "parallel.pp=2",
                              "parallel.schedule=dualpipev", ranks=2),
        # each packed row split over 2 ranks: its samples' masks, padding and MTP targets cross the chunks
        "cp2": _run(tmp_path, "cp2", chat, "train.micro_batch=2", "parallel.cp=2", ranks=2),
    }
    for name, rows in layouts.items():
        for a, b in zip(reference, rows, strict=True):
            # float32; micro-batches, ranks and expert shards sum in other orders: 1e-5 relative
            for key in ("loss/lm", "loss/mtp", "loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (name, a["step"], key)
        # the held-out conversations' assistant tokens, normalised the same way
        assert rows[-1]["eval/loss/lm"] == pytest.approx(reference[-1]["eval/loss/lm"], rel=1e-5), name
    assert reference[-1]["loss/lm"] < reference[0]["loss/lm"]


def test_the_first_loss_counts_assistant_tokens_over_the_global_batch(tmp_path, chat):
    """loss/lm of step 1 = the summed cross entropy of the step's counted targets / their number,
    from the same weights (a Hugging Face folder both start from)."""
    cfg = load_preset("tiny")
    spec = get_spec(cfg.arch)
    torch.manual_seed(0)
    model = spec.build_module(cfg)
    spec.save_hf(model, tmp_path / "init")
    rows = _run(tmp_path, "run", chat, "train.micro_batch=4", f"model.init_from={tmp_path / 'init'}")
    data_cfg = DataConfig(path=str(chat), valid_fraction=0.05)
    sampler, _ = build_data(data_cfg, SEQ, 0, ByteTokenizer(), cfg.vocab_size)
    inputs, labels, positions, real = (torch.cat(t) for t in zip(*sampler.micro_batches(0, BATCH, BATCH, 0, 1)))
    counted = labels != IGNORE_INDEX
    assert 0 < int(counted.sum()) < counted.numel() // 2  # the prompts and the padding do not count
    assert int(counted.sum()) == sampler.counted_targets(0, BATCH)
    model.train()
    with torch.no_grad():
        out = model(inputs, labels, samples=PackedSamples(positions, real), mtp_weight=0.1)
    assert rows[0]["loss/lm"] == pytest.approx(float(out.loss_lm), rel=1e-5)


def test_pretraining_with_sample_masking_is_the_same_in_a_pipeline(tmp_path):
    """data.sample_masking=true: documents of the shipped corpus isolated in each sequence, the same
    losses on one rank and under DualPipeV."""
    # documents average 4.8K tokens: 16K tokens a step hold a few of their ends
    run = ["model=tiny", "train.max_steps=2", "train.seq_len=512", "train.global_batch=32", "train.micro_batch=4",
           "logging.progress=false", "data.sample_masking=true"]
    run_cli([*run, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    torchrun(2, [*run, "parallel.pp=2", "parallel.schedule=dualpipev", f"hydra.run.dir={tmp_path / 'pp2'}"], tmp_path)
    run_cli([*run, "data.sample_masking=false", f"hydra.run.dir={tmp_path / 'unmasked'}"], tmp_path)
    one, pp2, unmasked = (read_metrics(tmp_path / name) for name in ("one", "pp2", "unmasked"))
    for a, b in zip(one, pp2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # the masks change what a token after a document's end sees
    assert max(abs(a["loss/lm"] - b["loss/lm"]) for a, b in zip(one, unmasked)) > 1e-4

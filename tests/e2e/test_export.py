"""moetron-export writes a run's newest checkpoint, whatever its layout, as a Hugging Face folder that
transformers loads; `model.init_from` starts a run from such a folder in any layout."""

import pytest
import torch

from moetron.models import build_model
from moetron.models.deepseek_v3 import load_preset
from moetron.checkpoint import dcp_io
from moetron.data.windows import BatchSampler, load_source
from moetron.data.tokenizers import ByteTokenizer
from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli

transformers = pytest.importorskip("transformers")
RUN = ["model=tiny", "train.seq_len=64", "train.global_batch=16", "train.micro_batch=2", "logging.progress=false",
       "data.valid_fraction=0"]  # the whole stream, as the test's own sampler reads it


def _whole_model(run_dir):
    """The checkpoint's whole model, read in this process."""
    step_dir = sorted((run_dir / "checkpoints").iterdir())[-1]
    model = build_model(load_preset("tiny"))
    model.load_state_dict(dcp_io.load_whole(step_dir, "model/"))
    return model.eval()


def test_export_from_a_pipelined_expert_parallel_run_and_start_from_it(tmp_path):
    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    torchrun(4, [*RUN, "train.max_steps=3", "parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipev",
                 f"hydra.run.dir={run_dir}"], tmp_path)
    run_cli([str(run_dir), "--hf", str(hf_dir)], tmp_path, module="moetron.train.export_cli")
    assert (hf_dir / "config.json").is_file() and (hf_dir / "mtp.safetensors").is_file()

    ours = _whole_model(run_dir)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the same weights and float32 ops in another library: 1e-5 relative
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)

    # a run that starts from the folder: its first loss is the exported weights' loss on the first batch
    sampler = BatchSampler.of_tokens(load_source("builtin", ByteTokenizer()), 64, 0)
    ours.train()  # the balance loss counts in training (with gradients on), as in the run
    # the trainer divides each depth's summed loss by the batch's tokens (eq. 24's 1/T, MTP's too)
    expected = float(torch.stack([ours(x, y, loss_denominator=x.numel()).loss.detach()
                                  for x, y in sampler.micro_batches(0, 16, 8, 0, 1)]).mean())
    one = run_cli([*RUN, "train.micro_batch=8", "train.max_steps=1", f"model.init_from={hf_dir}",
                   f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    ep2 = torchrun(2, [*RUN, "train.max_steps=1", "parallel.ep=2", f"model.init_from={hf_dir}",
                       f"hydra.run.dir={tmp_path / 'ep2'}"], tmp_path)
    assert one.returncode == 0 and ep2.returncode == 0
    for name in ("one", "ep2"):
        # float32; micro-batches and expert shards sum in another order: 1e-5 relative
        assert read_metrics(tmp_path / name)[0]["loss"] == pytest.approx(expected, rel=1e-5), name


def test_init_from_a_missing_folder_names_the_key(tmp_path):
    proc = run_cli([*RUN, "train.max_steps=1", f"model.init_from={tmp_path / 'nothing'}",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, check=False)
    assert proc.returncode == 2 and "model.init_from=" in proc.stderr and "moetron-export" in proc.stderr


def test_a_zoo_family_exports_from_an_expert_parallel_run_and_starts_from_its_folder(tmp_path):
    """GPT-OSS, the family whose adapter converts most (router renamed, experts transposed and
    interleaved): the export of a 2-rank EP run loads in transformers with the checkpoint's logits,
    and a run started from the folder begins at the exported weights' loss."""
    from moetron.models import load_preset as load_any_preset

    run = ["model=gpt_oss_tiny", *RUN[1:]]
    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    torchrun(2, [*run, "train.max_steps=2", "parallel.ep=2", f"hydra.run.dir={run_dir}"], tmp_path)
    run_cli([str(run_dir), "--hf", str(hf_dir)], tmp_path, module="moetron.train.export_cli")
    ours = build_model(load_any_preset("gpt_oss_tiny"))
    ours.load_state_dict(dcp_io.load_whole(sorted((run_dir / "checkpoints").iterdir())[-1], "model/"))
    theirs = transformers.GptOssForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    theirs.config._attn_implementation = "eager"
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours.eval()(ids), rtol=1e-5, atol=1e-5)
    sampler = BatchSampler.of_tokens(load_source("builtin", ByteTokenizer()), 64, 0)
    ours.train()
    # the trainer divides each depth's summed loss by the batch's tokens (eq. 24's 1/T, MTP's too)
    expected = float(torch.stack([ours(x, y, loss_denominator=x.numel()).loss.detach()
                                  for x, y in sampler.micro_batches(0, 16, 8, 0, 1)]).mean())
    run_cli([*run, "train.micro_batch=8", "train.max_steps=1", f"model.init_from={hf_dir}",
             f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert read_metrics(tmp_path / "one")[0]["loss"] == pytest.approx(expected, rel=1e-5)

"""Real data as a user brings it: moetron-data with a Hugging Face tokenizer, a blend of two token
files, validation loss in one process and in a pipeline, and bad data refused before training."""
import json

import numpy as np
import pytest

from tests.e2e.test_expert_parallel_cli import torchrun
from tests.e2e.test_train_cli import read_metrics, run_cli
from tests.unit.test_data import TEXT, bpe_folder

RUN = ["model=tiny", "train.seq_len=32", "train.global_batch=8", "train.micro_batch=4", "logging.progress=false",
       "train.ckpt_every=1000"]


@pytest.fixture
def corpora(tmp_path):
    """Two token files made by moetron-data with a BPE tokenizer, and the tokenizer's folder."""
    tokenizer = bpe_folder(tmp_path)
    for name, lines in (("a", TEXT * 60), ("b", list(reversed(TEXT)) * 40)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
        proc = run_cli([str(tmp_path / f"{name}.jsonl"), "--output", str(tmp_path / "data" / name), "--tokenizer",
                        str(tokenizer), "--workers", "2"], tmp_path, module="moetron.data.cli")
        assert "tokens (uint16)" in proc.stdout
    return tmp_path / "data", tokenizer


def test_a_blend_with_validation_loss_in_one_process_and_in_a_pipeline(tmp_path, corpora):
    data, tokenizer = corpora
    args = [*RUN, "train.max_steps=4", "train.eval_every=2", f"data.tokenizer={tokenizer}",
            f"data.blend=[[0.75,{data / 'a'}],[0.25,{data / 'b'}.bin]]"]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    torchrun(2, [*args, "parallel.pp=2", f"hydra.run.dir={tmp_path / 'pp2'}"], tmp_path)
    one, pp2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "pp2")
    assert [("eval/loss" in m, "eval/loss/lm" in m) for m in one] == [(False, False), (True, True)] * 2
    assert one[0][f"data/share/{data / 'a'}"] == 0.75 and one[0][f"data/share/{data / 'b'}.bin"] == 0.25
    for a, b in zip(one, pp2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        if "eval/loss" in a:  # the same fixed batches, forward only, in both layouts
            assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-5)
            assert a["eval/loss/lm"] < a["eval/loss"]  # the MTP term counts in the total
    assert one[3]["eval/loss"] < one[1]["eval/loss"]  # it learns on held-out data too


def test_a_token_file_beyond_the_vocabulary_is_refused_naming_it(tmp_path):
    prefix = tmp_path / "big"
    np.full(1000, 600, dtype="<u2").tofile(f"{prefix}.bin")
    (tmp_path / "big.json").write_text(json.dumps({"format": "moetron-tokens", "version": 1, "dtype": "uint16",
                                                   "num_tokens": 1000}))
    proc = run_cli([*RUN, "train.max_steps=1", f"data.path={prefix}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                   env_extra={"HYDRA_FULL_ERROR": "0"}, check=False)
    assert proc.returncode == 2
    assert f"{prefix}.bin holds token id 600, not below model.vocab_size=512" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_moetron_data_refuses_input_that_yields_no_tokens(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    proc = run_cli([str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "out")], tmp_path,
                   module="moetron.data.cli", check=False)
    assert proc.returncode == 2 and "yielded no tokens" in proc.stderr
    assert not list(tmp_path.glob("out*"))

"""Real data: Hugging Face tokenizers built here (nothing downloaded), uint32 token files, Megatron-LM
indexed datasets, blends, the held-out validation share, and bad data refused naming the file."""
import json
import struct

import numpy as np
import pytest
import torch

from moetron.data.windows import Blend, PackedWindows
from moetron.data.token_files import MEGATRON_MAGIC, TokenSource, open_token_file, write_token_file
from moetron.data.tokenizers import ByteTokenizer, HFTokenizer

tokenizers = pytest.importorskip("tokenizers")

TEXT = ["the quick brown fox jumps over the lazy dog", "a mixture of experts routes every token to a few experts",
        "pipelines overlap communication with computation"]


def bpe_folder(tmp_path, vocab_size=300):
    """A byte-level BPE trained on a few sentences, with DeepSeek-V3's conventions (BOS added, EOS
    named in tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 20, trainer)
    folder = tmp_path / "bpe"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True}))
    return folder


def big_word_level(tmp_path, entries=70_000):
    """A word-level tokenizer with more than 65,536 entries (ids need uint32)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for t in TEXT for w in t.split()})
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), entries)})  # filler words named by their ids
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "words.json"
    tok.save(str(path))
    return path, vocab


def test_a_local_hf_tokenizer_keeps_its_bos_and_eos_conventions(tmp_path):
    tok = HFTokenizer(str(bpe_folder(tmp_path)))
    ids = tok.encode(TEXT[0])
    assert ids[0] == tok.bos_id == 0 and tok.eos_id == 1 and ids.dtype == np.uint32
    assert tok.decode(ids[1:]) == TEXT[0]
    with pytest.raises(FileNotFoundError, match="data.tokenizer='nowhere'"):
        HFTokenizer("nowhere")


def test_token_files_switch_to_uint32_for_large_vocabularies_and_stream_with_workers(tmp_path):
    path, vocab = big_word_level(tmp_path)
    tok = HFTokenizer(str(path))
    assert tok.vocab_size == 70_000 and tok.eos_id == 1  # found by its name: no tokenizer_config.json
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t + " w69999"}) + "\n" for t in TEXT * 50))
    one = write_token_file([corpus], tmp_path / "one", tok)
    many = write_token_file([corpus], tmp_path / "many", tok, workers=2)
    assert one["dtype"] == "uint32" and one["max_token_id"] == vocab["w69999"] == 69_999
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "many.bin").read_bytes()  # order kept
    assert many["num_documents"] == 150
    source = open_token_file(str(tmp_path / "one.bin"))  # with or without .bin
    assert source.tokens.dtype == np.dtype("<u4") and int(source.tokens.max()) == 69_999
    with pytest.raises(ValueError, match=r"one.bin holds token id 69999, not below model.vocab_size=512"):
        source.check_vocab(512)
    source.check_vocab(70_000)
    small = write_token_file([corpus], tmp_path / "bytes", ByteTokenizer())
    assert small["dtype"] == "uint16"


def _write_megatron(prefix, docs, dtype_code, dtype):
    """A Megatron-LM indexed dataset as its documented format lays it out (one sequence per document)."""
    lengths = [len(d) for d in docs]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * np.dtype(dtype).itemsize
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(MEGATRON_MAGIC + struct.pack("<QBQQ", 1, dtype_code, len(docs), len(docs) + 1))
        f.write(np.asarray(lengths, dtype="<i4").tobytes())
        f.write(np.asarray(pointers, dtype="<i8").tobytes())
        f.write(np.arange(len(docs) + 1, dtype="<i8").tobytes())


@pytest.mark.parametrize("code,dtype", [(8, "<u2"), (4, "<i4")])
def test_megatron_indexed_datasets_are_read_as_they_are(tmp_path, code, dtype):
    docs = [[5, 6, 7, 0], [8, 9, 0], [10, 11, 12, 13, 0]]
    _write_megatron(tmp_path / "corpus_text_document", docs, code, dtype)
    for path in ("corpus_text_document", "corpus_text_document.bin"):
        source = open_token_file(str(tmp_path / path))
        assert source.tokens.tolist() == [t for d in docs for t in d]
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "bad.bin").write_bytes(bytes(8))
    with pytest.raises(ValueError, match="bad.idx is not a Megatron-LM indexed dataset"):
        open_token_file(str(tmp_path / "bad"))


def test_bad_input_is_refused_naming_the_file(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl:2: not UTF-8"):
        write_token_file([latin], tmp_path / "out", ByteTokenizer())
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match="empty.jsonl yielded no tokens"):
        write_token_file([empty], tmp_path / "out", ByteTokenizer())
    assert not list(tmp_path.glob("out*"))  # nothing half-written is left


def _source(n, offset=0):
    return TokenSource(np.arange(offset, offset + n, dtype=np.int64), f"src{offset}")


def test_a_blend_interleaves_by_weight_and_any_step_is_found_without_replaying():
    blend = Blend([PackedWindows(_source(1001), 10, 0), PackedWindows(_source(1001, 5000), 10, 0),
                   PackedWindows(_source(1001, 9000), 10, 0)], [0.5, 0.3, 0.2], ["a", "b", "c"])
    order = blend.sources_of(0, 1000)
    counts = np.zeros(3)
    for g, (i, k) in enumerate(order):
        assert k == counts[i]  # each source's samples in order
        counts[i] += 1
        assert np.abs(counts - np.array([0.5, 0.3, 0.2]) * (g + 1)).max() <= 1.0  # within one at every prefix
    fresh = Blend(blend.parts, [0.5, 0.3, 0.2], blend.names)
    for g in (0, 1, 7, 123, 999):
        assert fresh.counts_before(g) == [sum(1 for i, _ in order[:g] if i == s) for s in range(3)]
        assert fresh.sources_of(g, 1) == order[g:g + 1]  # the same sample, found by search
    assert fresh.shares(0, 10) == {"a": 0.5, "b": 0.3, "c": 0.2}
    assert torch.equal(fresh.windows(40, 5), blend.windows(40, 5))


def test_the_validation_share_is_held_out_of_training_and_read_in_order():
    train, valid = PackedWindows.split(_source(1001), 10, 0, 0.1)
    assert (train.num_windows, valid.num_windows) == (90, 10)
    seen = {int(train.window(k)[0]) for k in range(90)}
    held = [int(valid.window(k)[0]) for k in range(10)]
    assert held == list(range(900, 1000, 10)) and not seen & set(held)
    with pytest.raises(ValueError, match="leave none to train on"):
        PackedWindows.split(_source(11), 10, 0, 0.5)

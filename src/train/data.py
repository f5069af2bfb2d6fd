"""Training data: a byte-level tokenizer, memory-mapped token files, and a packed, resumable sampler.

Token file format (written by `moetron-data`, read with numpy.memmap):
    PREFIX.bin   the tokens of all documents, each followed by EOS, as little-endian uint16
    PREFIX.json  {"format": "moetron-tokens", "version": 1, "dtype": "uint16", "num_tokens": N,
                  "num_documents": D, "tokenizer": "bytes", "doc_offsets_file": null, "sources": [...]}

Packing: the token stream is cut into windows of seq_len + 1 tokens that start every seq_len tokens
(inputs and next-token labels), so sequences cross document boundaries at EOS and no token is
padding. The sampler shuffles windows per epoch with a seeded generator; sample g of the run is a
pure function of (seed, g), so resuming at step s needs only s.

Shape legend: B micro-batch, S sequence length, N windows.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT, VERSION = "moetron-tokens", 1


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, EOS = 256: needs no download and covers any text."""

    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


TOKENIZERS = {"bytes": ByteTokenizer}


def get_tokenizer(name: str) -> ByteTokenizer:
    if name not in TOKENIZERS:
        raise ValueError(f"data.tokenizer={name!r}: choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[name]()


def read_documents(path: Path, jsonl_key: str = "text"):
    """Documents of a .jsonl file (one JSON object per line, text under `jsonl_key`) or a text file
    (the whole file is one document)."""
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[jsonl_key]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{line_no}: expected a JSON object with key {jsonl_key!r} ({err})") from err
    else:
        yield path.read_text(encoding="utf-8")


def tokenize_documents(docs, tokenizer) -> tuple[np.ndarray, int]:
    chunks, eos = [], np.array([tokenizer.eos_id], dtype=np.uint16)
    for doc in docs:
        chunks += [tokenizer.encode(doc), eos]
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)
    return tokens, len(chunks) // 2


def write_token_file(inputs: list[Path], prefix: Path, tokenizer, jsonl_key: str = "text") -> dict:
    """Tokenize `inputs` into PREFIX.bin / PREFIX.json, each written to a temp file and renamed."""
    tokens, num_docs = tokenize_documents((d for p in inputs for d in read_documents(p, jsonl_key)), tokenizer)
    meta = {"format": FORMAT, "version": VERSION, "dtype": "uint16", "num_tokens": int(tokens.size),
            "num_documents": num_docs, "tokenizer": tokenizer.name, "sources": [str(p) for p in inputs]}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix, write in ((".bin", lambda f: f.write(tokens.astype("<u2").tobytes())),
                          (".json", lambda f: f.write(json.dumps(meta, indent=1).encode()))):
        final = prefix.with_name(prefix.name + suffix)
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    return meta


def load_token_file(prefix: Path) -> np.ndarray:
    """Memory-map PREFIX.bin after checking it against PREFIX.json; errors name the path."""
    meta_path, bin_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".bin")
    for path in (meta_path, bin_path):
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path} (data.path={prefix}); build it with "
                                    f"`moetron-data YOUR_TEXT.jsonl --output {prefix}`")
    try:
        meta = json.loads(meta_path.read_text())
        ok = meta.get("format") == FORMAT and meta.get("version") == VERSION and meta.get("dtype") == "uint16"
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ValueError(f"corrupt data file {meta_path}: not a {FORMAT} v{VERSION} header; rebuild with moetron-data")
    expected = meta["num_tokens"] * 2
    if bin_path.stat().st_size != expected:
        raise ValueError(f"corrupt data file {bin_path}: {bin_path.stat().st_size} bytes, header says {expected}; "
                         "rebuild with moetron-data")
    if meta["num_tokens"] == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(bin_path, dtype="<u2", mode="r", shape=(meta["num_tokens"],))


def load_tokens(path: str, tokenizer) -> np.ndarray:
    """The token stream of `data.path`: "builtin" (the shipped corpus) or a token-file prefix."""
    if path == "builtin":
        from moetron.train.corpus import corpus_path

        return tokenize_documents(read_documents(Path(str(corpus_path()))), tokenizer)[0]
    return load_token_file(Path(path).expanduser())


@dataclass
class PackedSampler:
    """Deterministic, resumable sampling of packed windows, sharded over data-parallel ranks."""

    tokens: np.ndarray
    seq_len: int
    seed: int

    def __post_init__(self) -> None:
        self.num_windows = (len(self.tokens) - 1) // self.seq_len
        if self.num_windows < 1:
            raise ValueError(f"the data has {len(self.tokens)} tokens: too few for train.seq_len={self.seq_len}")
        self._epoch, self._order = -1, None

    def window(self, sample: int) -> torch.Tensor:
        """Tokens [S + 1] of global sample `sample` (epoch = sample // num_windows)."""
        epoch, pos = divmod(sample, self.num_windows)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_windows, generator=gen)
        start = int(self._order[pos]) * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))

    def micro_batches(self, step: int, global_batch: int, micro_batch: int, dp_rank: int, dp: int):
        """This rank's micro-batches of optimizer step `step`: (inputs [B, S], labels [B, S])."""
        per_rank = global_batch // dp
        first = step * global_batch + dp_rank * per_rank
        for m in range(per_rank // micro_batch):
            rows = torch.stack([self.window(first + m * micro_batch + i) for i in range(micro_batch)])
            yield rows[:, :-1], rows[:, 1:]

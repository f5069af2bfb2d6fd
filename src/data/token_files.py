"""Token files: moetron's own (written by `moetron-data`) and Megatron-LM's indexed datasets, both
memory-mapped as one token stream.

moetron's format, PREFIX.bin + PREFIX.json:
    PREFIX.bin   every document's tokens followed by EOS, little-endian uint16, or uint32 when the
                 tokenizer has more than 65,536 tokens
    PREFIX.json  {"format": "moetron-tokens", "version": 2, "dtype": "uint16" | "uint32",
                  "num_tokens", "num_documents", "tokenizer", "vocab_size", "eos_id",
                  "max_token_id", "sources"}   (version 1: uint16, no vocab fields)

Megatron-LM's (what its `preprocess_data.py` writes), PREFIX.bin + PREFIX.idx: the .idx starts with
b"MMIDIDX\\x00\\x00", a little-endian uint64 version (1), a uint8 dtype code (1 uint8, 2 int8,
3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16), uint64 sequence and document counts,
then int32 sequence lengths, int64 byte offsets of the sequences in .bin, int64 document indices.
The .bin holds the sequences back to back (with EOD after each document under --append-eod).

Writing is streamed (a corpus larger than memory works) with several tokenizing processes, into
temp files renamed into place at the end; bad input stops it with an error naming the file.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

FORMAT, VERSION = "moetron-tokens", 2
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                   8: np.uint16}
DOCS_PER_TASK = 64  # documents a tokenizing process takes at a time


@dataclass
class TokenSource:
    """One file's token stream, memory-mapped; `max_token_id` from its header where it has one."""
    tokens: np.ndarray
    path: str
    max_token_id: Optional[int] = None

    def check_vocab(self, vocab_size: int) -> None:
        """Every id below `vocab_size` (a file without the maximum in its header is scanned once, and
        the result kept beside it in PATH.maxid.json for the next start, keyed by size and time)."""
        top = self.max_token_id
        if top is None and len(self.tokens):
            top = self._scanned_max()
        if top is not None and top >= vocab_size:
            raise ValueError(f"{self.path} holds token id {top}, not below model.vocab_size={vocab_size}: it was made "
                             "with a larger tokenizer; raise model.vocab_size or rebuild the file with this tokenizer")


    def _scanned_max(self) -> int:
        path, cache = Path(self.path), Path(self.path + ".maxid.json")
        stat = path.stat() if path.is_file() else None
        key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns} if stat else None
        try:
            saved = json.loads(cache.read_text())
            if key and {k: saved.get(k) for k in key} == key:
                return int(saved["max_token_id"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        top = max(int(self.tokens[i:i + (1 << 26)].max()) for i in range(0, len(self.tokens), 1 << 26))
        if key:
            try:  # best effort: a read-only folder just scans again next time
                tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
                tmp.write_text(json.dumps({**key, "max_token_id": top}))
                os.replace(tmp, cache)
            except OSError:
                pass
        return top


# -- reading -------------------------------------------------------------------------------------

def _prefix(path: str) -> Path:
    """data.path with or without its .bin / .idx / .json suffix."""
    p = Path(path).expanduser()
    return p.with_suffix("") if p.suffix in (".bin", ".idx", ".json") else p


def with_suffix(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


def read_header(path) -> dict:
    """The PREFIX.json header of a moetron token file ({} where there is none)."""
    meta_path = with_suffix(_prefix(str(path)), ".json")
    try:
        return json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def open_token_file(path: str, allow_chat: bool = False) -> TokenSource:
    """The token stream of a moetron token file or a Megatron-LM indexed dataset, by prefix; a chat
    file (`moetron-data --chat`) only with `allow_chat` (moetron.data.chat_files reads those)."""
    prefix = _prefix(path)
    if with_suffix(prefix, ".idx").is_file():
        return _open_megatron(prefix)
    if not allow_chat and read_header(prefix).get("kind") == "chat":
        raise ValueError(f"data.path={path} is chat data (moetron-data --chat): fine-tune on it with stage=sft")
    if with_suffix(prefix, ".json").is_file() or with_suffix(prefix, ".bin").is_file():
        return _open_moetron(prefix)
    raise FileNotFoundError(f"data file not found: {with_suffix(prefix, '.json')} or {with_suffix(prefix, '.idx')} "
                            f"(data.path={path}); build it with `moetron-data YOUR_TEXT.jsonl --output {prefix}`")


def _open_moetron(prefix: Path) -> TokenSource:
    meta_path, bin_path = with_suffix(prefix, ".json"), with_suffix(prefix, ".bin")
    for path in (meta_path, bin_path):
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}; rebuild {prefix} with moetron-data")
    try:
        meta = json.loads(meta_path.read_text())
        ok = meta.get("format") == FORMAT and meta.get("version") in (1, VERSION) and \
            meta.get("dtype") in ("uint16", "uint32")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"corrupt data file {meta_path}: not a {FORMAT} header; rebuild with moetron-data")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    expected = meta["num_tokens"] * dtype.itemsize
    if bin_path.stat().st_size != expected:
        raise ValueError(f"corrupt data file {bin_path}: {bin_path.stat().st_size} bytes, header says {expected}; "
                         "rebuild with moetron-data")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["num_tokens"],)) if meta["num_tokens"] else \
        np.zeros(0, dtype=dtype)
    return TokenSource(tokens, str(bin_path), meta.get("max_token_id"))


def _open_megatron(prefix: Path) -> TokenSource:
    idx_path, bin_path = with_suffix(prefix, ".idx"), with_suffix(prefix, ".bin")
    if not bin_path.is_file():
        raise FileNotFoundError(f"data file not found: {bin_path} (beside {idx_path})")
    with idx_path.open("rb") as f:
        head = f.read(len(MEGATRON_MAGIC) + 8 + 1 + 8 + 8)
    if len(head) < 34 or head[:9] != MEGATRON_MAGIC:
        raise ValueError(f"{idx_path} is not a Megatron-LM indexed dataset (no {MEGATRON_MAGIC!r} header)")
    version, code, num_seqs, _num_docs = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in MEGATRON_DTYPES or MEGATRON_DTYPES[code] not in (np.uint8, np.int16, np.int32,
                                                                                     np.int64, np.uint16):
        raise ValueError(f"{idx_path}: index version {version} with dtype code {code} is not one moetron reads "
                         "(version 1, integer tokens)")
    dtype = np.dtype(MEGATRON_DTYPES[code]).newbyteorder("<")
    lengths = np.memmap(idx_path, dtype="<i4", mode="r", offset=34, shape=(num_seqs,)) if num_seqs else np.zeros(0)
    num_tokens = int(np.asarray(lengths, dtype=np.int64).sum())
    if bin_path.stat().st_size < num_tokens * dtype.itemsize:
        raise ValueError(f"corrupt data file {bin_path}: {bin_path.stat().st_size} bytes, {idx_path} says "
                         f"{num_tokens} tokens of {dtype.itemsize} bytes")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,)) if num_tokens else np.zeros(0, dtype)
    return TokenSource(tokens, str(bin_path))


# -- writing -------------------------------------------------------------------------------------

def read_documents(path: Path, jsonl_key: str = "text") -> Iterator[str]:
    """Documents of a .jsonl file (one JSON object per line, text under `jsonl_key`) or a text file
    (the whole file is one document). Text that is not UTF-8 is an error naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix != ".jsonl":
        try:
            yield path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
        return
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {err.start}: {err.reason})") from err
            if not line.strip():
                continue
            try:
                yield json.loads(line)[jsonl_key]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with key {jsonl_key!r} ({err})") from err


_worker_tokenizer = None


def _init_worker(tokenizer_name: str) -> None:
    global _worker_tokenizer
    from moetron.data.tokenizers import get_tokenizer

    _worker_tokenizer = get_tokenizer(tokenizer_name)


def _tokenize(docs: list[str]) -> list[np.ndarray]:
    return [_worker_tokenizer.encode(doc) for doc in docs]


def in_batches(items: Iterator, size: int) -> Iterator[list]:
    """`items` in lists of `size` (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def token_dtype(tokenizer) -> np.dtype:
    """uint16 tokens, or uint32 when the tokenizer has more than 65,536."""
    return np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")


@contextlib.contextmanager
def write_atomically(path: Path, text: bool = False):
    """A file object writing to a temp file beside `path`, synced and renamed onto `path` when the
    block ends without an error; removed otherwise (`path` is then as it was)."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with tmp.open("w" if text else "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_token_file(inputs: list[Path], prefix: Path, tokenizer, jsonl_key: str = "text", workers: int = 1,
                     progress: Optional[bool] = False) -> dict:
    """Tokenize `inputs` into PREFIX.bin / PREFIX.json as it reads them (`workers` processes), each
    file written to a temp file and renamed into place; an input that yields no tokens is an error.
    `progress`: a progress bar (None: on a terminal)."""
    from tqdm import tqdm

    dtype = token_dtype(tokenizer)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    docs = (d for p in inputs for d in read_documents(Path(p), jsonl_key))
    stats = {"num_tokens": 0, "num_documents": 0, "text_tokens": 0, "max_token_id": int(tokenizer.eos_id)}
    bar = tqdm(total=sum(Path(p).stat().st_size for p in inputs if Path(p).is_file()), unit="B", unit_scale=True,
               desc="tokenizing", disable=None if progress is None else not progress)
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer.name,)) if workers > 1 else None
    try:
        with write_atomically(with_suffix(prefix, ".bin")) as out:
            batches = in_batches(docs, DOCS_PER_TASK)
            if pool is None:
                encoded_batches = ([tokenizer.encode(d) for d in batch] for batch in batches)
            else:
                encoded_batches = pool.imap(_tokenize, batches)
            for encoded in encoded_batches:
                for ids in encoded:
                    if ids.size:
                        stats["max_token_id"] = max(stats["max_token_id"], int(ids.max()))
                    out.write(ids.astype(dtype).tobytes())
                    out.write(eos.tobytes())
                    stats["num_tokens"] += ids.size + 1
                    stats["text_tokens"] += ids.size
                    stats["num_documents"] += 1
                    bar.update(ids.size * 4)  # about 4 bytes of text per token
            if stats["text_tokens"] == 0:
                raise ValueError(f"{', '.join(str(p) for p in inputs)} yielded no tokens ({stats['num_documents']} "
                                 "documents, all empty); nothing was written")
        meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "num_tokens": stats["num_tokens"],
                "num_documents": stats["num_documents"], "tokenizer": tokenizer.name,
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "max_token_id": stats["max_token_id"],
                "sources": [str(p) for p in inputs]}
        with write_atomically(with_suffix(prefix, ".json"), text=True) as f:
            f.write(json.dumps(meta, indent=1))
        return meta
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


def tokenize_in_memory(docs, tokenizer) -> np.ndarray:
    """A small corpus (the shipped one) as one token stream, each document followed by EOS."""
    chunks = []
    for doc in docs:
        chunks += [tokenizer.encode(doc).astype(np.int64), np.array([tokenizer.eos_id], dtype=np.int64)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)

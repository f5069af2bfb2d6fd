"""Chat token files: conversations rendered by a chat template, with the mask of the tokens that count.

`moetron-data --chat` writes, beside a token file's PREFIX.bin and PREFIX.json (moetron.data.token_files,
with "kind": "chat" in the header):
    PREFIX.mask.bin     uint8 per token: 1 where the token belongs to an assistant turn (it counts in
                        the loss as a label), 0 elsewhere
    PREFIX.samples.bin  little-endian int64 [num_samples + 1]: where each conversation starts, and the end

Each conversation is one sample, kept whole: the trainer packs samples into rows of train.seq_len and
decides there what to do with one that is longer (moetron.data.packing).
"""
from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from moetron.data.chat import ChatError, ChatTemplate, encode_chat, messages_of
from moetron.data.token_files import FORMAT, VERSION, in_batches, token_dtype, with_suffix, write_atomically

MASK_SUFFIX, SAMPLES_SUFFIX = ".mask.bin", ".samples.bin"


@dataclass
class ChatSource:
    """A chat token file, memory-mapped: tokens, their loss mask, and the samples' offsets."""

    tokens: np.ndarray
    counts: np.ndarray  # uint8 [num_tokens]
    offsets: np.ndarray  # int64 [num_samples + 1]
    path: str
    max_token_id: Optional[int] = None

    def check_vocab(self, vocab_size: int) -> None:
        if self.max_token_id is not None and self.max_token_id >= vocab_size:
            raise ValueError(f"{self.path} holds token id {self.max_token_id}, not below model.vocab_size={vocab_size}: "
                             "it was made with a larger tokenizer; raise model.vocab_size or rebuild the file")

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, counts) of conversation i."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[start:end], self.counts[start:end]


def read_conversations(path: Path) -> Iterator[tuple[dict, str]]:
    """(record, "FILE:LINE") of each non-empty line of a JSONL file of conversations."""
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ChatError(f"{where}: not UTF-8 text (byte {err.start}: {err.reason})") from err
            if line.strip():
                try:
                    yield json.loads(line), where
                except json.JSONDecodeError as err:
                    raise ChatError(f"{where}: not a JSON object ({err})") from err


_worker: dict = {}


def _init_worker(tokenizer_name: str, template: ChatTemplate) -> None:
    from moetron.data.tokenizers import get_tokenizer

    _worker.update(tokenizer=get_tokenizer(tokenizer_name), template=template)


def _encode_batch(batch: list[tuple[dict, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [encode_chat(messages_of(record, where), _worker["template"], _worker["tokenizer"], where)
            for record, where in batch]


def write_chat_file(inputs: list[Path], prefix: Path, tokenizer, template: ChatTemplate, workers: int = 1) -> dict:
    """Render and tokenize the conversations of `inputs` (JSONL) into a chat token file, each file
    written to a temp file and renamed into place; any bad conversation stops it, naming its line."""
    dtype = token_dtype(tokenizer)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    records = (item for path in inputs for item in read_conversations(Path(path)))
    stats = {"num_tokens": 0, "num_samples": 0, "counted_tokens": 0, "max_token_id": int(tokenizer.eos_id)}
    offsets = [0]
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer.name, template)) \
        if workers > 1 else None
    try:
        with write_atomically(with_suffix(prefix, ".bin")) as tokens_out, \
                write_atomically(with_suffix(prefix, MASK_SUFFIX)) as mask_out:
            batches = in_batches(records, 64)
            encoded_batches = pool.imap(_encode_batch, batches) if pool is not None else (
                [encode_chat(messages_of(r, w), template, tokenizer, w) for r, w in batch] for batch in batches)
            for encoded in encoded_batches:
                for ids, counts in encoded:
                    stats["max_token_id"] = max(stats["max_token_id"], int(ids.max()))
                    tokens_out.write(ids.astype(dtype).tobytes())
                    mask_out.write(counts.tobytes())
                    stats["num_tokens"] += len(ids)
                    stats["counted_tokens"] += int(counts.sum())
                    stats["num_samples"] += 1
                    offsets.append(stats["num_tokens"])
            if stats["num_samples"] == 0:
                raise ChatError(f"{', '.join(str(p) for p in inputs)}: no conversations; nothing was written")
            with write_atomically(with_suffix(prefix, SAMPLES_SUFFIX)) as samples_out:
                samples_out.write(np.asarray(offsets, dtype="<i8").tobytes())
            meta = {"format": FORMAT, "version": VERSION, "kind": "chat", "dtype": dtype.name, **stats,
                    "num_documents": stats["num_samples"], "tokenizer": tokenizer.name,
                    "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "chat_template": template.source,
                    "sources": [str(p) for p in inputs]}
            with write_atomically(with_suffix(prefix, ".json"), text=True) as meta_out:
                meta_out.write(json.dumps(meta, indent=1))
        return meta
    finally:
        if pool is not None:
            pool.terminate()


def open_chat_file(path: str) -> ChatSource:
    """A chat token file by prefix (what `moetron-data --chat` wrote)."""
    from moetron.data.token_files import open_token_file, read_header

    prefix = Path(path).expanduser()
    meta = read_header(prefix)
    if meta.get("kind") != "chat":
        raise ValueError(f"{prefix}: not a chat token file (write one with moetron-data --chat)")
    source = open_token_file(str(prefix), allow_chat=True)
    mask_path, samples_path = with_suffix(prefix, MASK_SUFFIX), with_suffix(prefix, SAMPLES_SUFFIX)
    for file in (mask_path, samples_path):
        if not file.is_file():
            raise FileNotFoundError(f"data file not found: {file}; rebuild {prefix} with moetron-data --chat")
    counts = np.memmap(mask_path, dtype=np.uint8, mode="r")
    offsets = np.fromfile(samples_path, dtype="<i8")
    if len(counts) != len(source.tokens) or len(offsets) != meta["num_samples"] + 1 or \
            int(offsets[-1]) != len(source.tokens):
        raise ValueError(f"corrupt chat data {prefix}: its mask or sample offsets do not match its tokens; "
                         "rebuild with moetron-data --chat")
    return ChatSource(source.tokens, counts, offsets, source.path, source.max_token_id)

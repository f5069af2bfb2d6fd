"""Tokenizers for `data.tokenizer` and `moetron-data --tokenizer`: the byte tokenizer (the default,
nothing to download) or a Hugging Face tokenizer from a local folder or `tokenizer.json`.

A Hugging Face tokenizer is loaded with the `tokenizers` library (its `tokenizer.json`); a folder
without one (a SentencePiece model only) goes through transformers' `AutoTokenizer`. Its
conventions come from `tokenizer_config.json` where the folder has one: the EOS token ends every
document, and with `add_bos_token` the BOS token starts it (DeepSeek-V3's tokenizer does both).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

# end-of-document tokens of common tokenizers, tried when tokenizer_config.json names none
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, EOS = 256: needs no download and covers any text."""

    name = "bytes"
    eos_id = 256
    bos_id: Optional[int] = None
    vocab_size = 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _token_name(entry) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder or tokenizer.json (nothing is downloaded)."""

    def __init__(self, path: str) -> None:
        where = Path(path).expanduser()
        if not where.exists():
            raise FileNotFoundError(f"data.tokenizer={path!r}: no such file or folder (give a local folder with "
                                    "tokenizer.json, or the file itself; or data.tokenizer=bytes)")
        folder = where if where.is_dir() else where.parent
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        file = where if where.is_file() else folder / "tokenizer.json"
        self.name = str(where)
        if file.is_file():
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(file))
            self._encode = lambda text: self._tok.encode(text, add_special_tokens=False).ids
            self._decode = self._tok.decode
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            token_to_id = self._tok.token_to_id
        else:  # a folder with a slow (SentencePiece) tokenizer only
            try:
                from transformers import AutoTokenizer
            except ImportError as err:
                raise ValueError(f"{folder} has no tokenizer.json; reading it needs transformers "
                                 "(pip install transformers)") from err
            auto = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self._encode = lambda text: auto.encode(text, add_special_tokens=False)
            self._decode = auto.decode
            self.vocab_size = len(auto)
            token_to_id = lambda tok: auto.convert_tokens_to_ids(tok) if tok in auto.get_vocab() else None  # noqa: E731
        eos_names = [_token_name(config.get("eos_token"))] if config.get("eos_token") else list(_EOS_NAMES)
        self.eos_id = next((token_to_id(n) for n in eos_names if n and token_to_id(n) is not None), None)
        if self.eos_id is None:
            raise ValueError(f"{where}: no end-of-document token found (tried {eos_names}); name it as eos_token in "
                             f"{folder / 'tokenizer_config.json'}")
        bos = _token_name(config.get("bos_token"))
        self.bos_id = token_to_id(bos) if bos and config.get("add_bos_token") else None

    def encode(self, text: str) -> np.ndarray:
        ids = self._encode(text)
        if self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return np.asarray(ids, dtype=np.uint32)

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])


def get_tokenizer(name: str):
    """`bytes`, or the path of a Hugging Face tokenizer (folder or tokenizer.json)."""
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name)

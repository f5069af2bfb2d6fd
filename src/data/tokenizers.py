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
    """UTF-8 bytes as tokens 0..255, EOS = 256: needs no download and covers any text. In chat data
    the text `eos_token` is EOS (its own chat template ends assistant turns with it)."""

    name = "bytes"
    eos_id = 256
    bos_id: Optional[int] = None
    vocab_size = 257
    bos_token, eos_token = "", "<|eos|>"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, the character index where each token starts), `eos_token` as EOS."""
        ids, starts, offset = [], [], 0
        for i, piece in enumerate(text.split(self.eos_token)):
            if i:  # the EOS text before this piece
                ids.append(np.array([self.eos_id], dtype=np.uint32))
                starts.append(np.array([offset]))
                offset += len(self.eos_token)
            ids.append(self.encode(piece))
            starts.append(offset + np.repeat(np.arange(len(piece)), [len(c.encode("utf-8")) for c in piece]))
            offset += len(piece)
        return np.concatenate(ids), np.concatenate(starts).astype(np.int64)

    def chat_template(self) -> tuple[Optional[str], str]:
        from moetron.data.chat_sample import BYTES_TEMPLATE

        return BYTES_TEMPLATE.read_text(encoding="utf-8"), str(BYTES_TEMPLATE)

    def decode(self, ids, keep_special: bool = False) -> str:
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
        self.bos_token = bos or ""
        self.eos_token = next(n for n in eos_names if n and token_to_id(n) == self.eos_id)
        self._config, self._folder = config, folder

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, the character index where each token starts); no BOS added (a chat template writes
        its own)."""
        if not hasattr(self, "_tok"):
            raise ValueError(f"{self.name}: chat data needs the tokenizer's tokenizer.json (a fast tokenizer), "
                             "which gives each token's place in the text")
        encoding = self._tok.encode(text, add_special_tokens=False)
        starts = np.array([start for start, _ in encoding.offsets], dtype=np.int64)
        return np.asarray(encoding.ids, dtype=np.uint32), starts

    def chat_template(self) -> tuple[Optional[str], str]:
        """(its chat template, where it is): tokenizer_config.json's `chat_template` (its "default"
        entry when it lists several) or chat_template.jinja in the folder; (None, ...) without one."""
        template = self._config.get("chat_template")
        if isinstance(template, list):
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template:
            return template, str(self._folder / "tokenizer_config.json")
        file = self._folder / "chat_template.jinja"
        return (file.read_text(encoding="utf-8"), str(file)) if file.is_file() else (None, str(self._folder))

    def encode(self, text: str) -> np.ndarray:
        ids = self._encode(text)
        if self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return np.asarray(ids, dtype=np.uint32)

    def decode(self, ids, keep_special: bool = False) -> str:
        """The text of `ids`; special tokens (chat markers, EOS) written out with `keep_special`."""
        return self._decode([int(i) for i in ids], skip_special_tokens=not keep_special)


def get_tokenizer(name: str):
    """`bytes`, or the path of a Hugging Face tokenizer (folder or tokenizer.json)."""
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name)

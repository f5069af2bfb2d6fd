"""The tensors of a Hugging Face folder's safetensors files, read a slice at a time.

    files = SafetensorsFiles(folder)                  # model.safetensors, or the shards its index names
    files.read("model.layers.3.mlp.experts.7.up_proj.weight")
    files.read("model.layers.3.mlp.experts.gate_up_proj", rows=range(8, 16))  # experts 8..15 only
    files.bytes_read                                  # what this process has read so far

safetensors maps each file and copies out only the bytes of what is asked for, so a rank that holds
a pipeline stage and an expert shard reads that, not the whole model (`model.init_from`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFiles:
    """Tensors by name across one folder's safetensors files (`names`: which files; default the
    model's own: its index's shards, or model.safetensors). Use as a context manager, or `close()`."""

    def __init__(self, folder, names: Optional[list[str]] = None) -> None:
        from safetensors import safe_open

        folder = Path(folder)
        if names is None:
            names = _model_files(folder)
        self._folder, self._names = folder, list(names)
        self._handles = {name: safe_open(str(folder / name), framework="pt") for name in names}
        self._file_of = {key: name for name, handle in self._handles.items() for key in handle.keys()}
        self.bytes_read = 0

    def __enter__(self) -> "SafetensorsFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def keys(self) -> list[str]:
        return list(self._file_of)

    def file_bytes(self) -> int:
        """Bytes of the files on disk (what reading all of them would cost, headers included)."""
        return sum((self._folder / name).stat().st_size for name in self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def read(self, key: str, rows: Optional[range] = None) -> torch.Tensor:
        """Tensor `key`, or only `rows` of its dim 0 (a contiguous range)."""
        if rows is None:
            tensor = self._handles[self._file_of[key]].get_tensor(key)
        else:
            if rows.step != 1:
                raise ValueError(f"{key}: rows {rows} are not contiguous")
            tensor = self._slice(key)[rows.start:rows.stop]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def _slice(self, key: str):
        return self._handles[self._file_of[key]].get_slice(key)


def _model_files(folder: Path) -> list[str]:
    """The model's safetensors files in `folder`: the shards its index names, or its single file."""
    if (folder / INDEX_FILE).is_file():
        return sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: moetron reads Hugging Face "
                            "folders in safetensors (save_pretrained(..., safe_serialization=True) writes them)")


"""What the forward passes in flight keep for their backward, measured while training runs.

`SavedTensorMeter.saving(tag)` wraps a forward pass in `torch.autograd.graph.saved_tensors_hooks`:
every tensor autograd saves is noted (a weak reference: the meter keeps nothing alive) under `tag`,
for a pipeline the (micro-batch, stage) the forward belongs to. `sample()`, called after each
forward, adds up the storages still alive (each once, at its size now: a recompute region's freed
outputs count 0; parameters, buffers and the step's input batches never) and the tags that still hold any, keeping the peaks of both until
`take_peak()`. A tensor kept past its backward (a weight gradient deferred to a pipeline's W action
holds its input) counts until it is freed, as the pipeline simulator counts a micro-batch-stage
from its F to its W. Liveness is the saved tensor object's: a storage that outlives every tensor
saved on it under another object is not seen. A forward metered but never back-propagated (a step
that failed) keeps what it saved alive: the hooks hand autograd the tensors themselves, and a saved
output holds its own node.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Hashable, Iterable

import torch
from torch import nn


def storage_key(t: torch.Tensor) -> int:
    """One number per storage, shared by all views of it."""
    return t.untyped_storage()._cdata


def module_state(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers of `modules`: the model's state, not what a forward keeps."""
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


class SavedTensorMeter:
    def __init__(self, params: Iterable[torch.Tensor] = ()) -> None:
        """`params`: tensors that are the model's state (`module_state`), never counted."""
        self._params = {storage_key(p) for p in params if not p.is_meta}
        self._ignored: set[int] = set()
        self._saved: dict[int, tuple[Hashable, list]] = {}  # storage -> (tag, weak refs of the tensors saved on it)
        self._tag: Hashable = None
        self.peak_bytes = 0  # since the last take_peak
        self.peak_tags = 0  # tags holding saved tensors at once, at most

    @contextmanager
    def saving(self, tag: Hashable):
        """Note what autograd saves inside, under `tag`."""
        outer, self._tag = self._tag, tag
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield
        finally:
            self._tag = outer

    def ignore(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count these (and no others named before) as the caller's, not the forward's: a step's
        input and target batches, which the caller holds for the whole step."""
        self._ignored = {storage_key(t) for t in tensors if isinstance(t, torch.Tensor)}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key in self._params or key in self._ignored:
            return t
        entry = self._saved.get(key)
        if entry is None or _alive(entry[1]) is None:  # new, or a freed storage's number taken again
            self._saved[key] = (self._tag, [weakref.ref(t)])
        else:
            entry[1].append(weakref.ref(t))
        return t

    def sample(self) -> tuple[int, int]:
        """(bytes, tags) of the saved tensors alive now; the peaks follow."""
        total, tags = 0, set()
        for key in list(self._saved):
            tag, refs = self._saved[key]
            tensor = _alive(refs)
            if tensor is None:
                del self._saved[key]
                continue
            nbytes = tensor.untyped_storage().nbytes()
            if nbytes:
                total += nbytes
                tags.add(tag)
        self.peak_bytes, self.peak_tags = max(self.peak_bytes, total), max(self.peak_tags, len(tags))
        return total, len(tags)

    def take_peak(self) -> int:
        """The peak bytes since the last call; starts the next period."""
        peak, self.peak_bytes, self.peak_tags = self.peak_bytes, 0, 0
        return peak


def _alive(refs: list):
    return next((t for t in (r() for r in refs) if t is not None), None)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t

"""Samples packed into rows of train.seq_len tokens, for fine-tuning on chat data (report section 5.1:
several samples per sequence, isolated by sample masking).

Each epoch shuffles the samples with a seeded generator and packs them in that order, first-fit
(each sample into the first row with room, rows kept in the order they were opened) or best-fit
(into the row it fills most tightly). A row is its samples back to back, then padding: positions
restart at 0 at each sample (and at the padding, which is a sample of its own that no other token
reads, no loss counts and no router counts in its loads); the label of a position is the sample's next token when that token counts (an
assistant token), IGNORE_INDEX otherwise and at each sample's last position.

A sample longer than the row is refused, or with `overlong="truncate"` cut to the row's length
(its first seq_len tokens): `overlong_count` says how many, and the trainer reports them.

Shape legend: S sequence length (train.seq_len).
"""
from __future__ import annotations

import bisect
from typing import Optional

import numpy as np
import torch

from moetron.data.chat_files import ChatSource
from moetron.models.common.linear_cross_entropy import IGNORE_INDEX

PACKINGS = ("first_fit", "best_fit")
OVERLONG = ("refuse", "truncate")


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into `lengths`, grouped into rows: each into the first row with room (a max-tree
    over the rows' free space finds it in log time)."""
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [0] * (2 * size)  # free[size + r]: room in row r (rows not yet opened: capacity)
    for r in range(size):
        free[size + r] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        node = 1
        while node < size:  # the leftmost leaf with room n
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        r = node - size
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into `lengths`, grouped into rows: each into the open row whose room is the smallest
    that holds it (a new row when none does)."""
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room, row), sorted
    for i, n in enumerate(lengths):
        at = bisect.bisect_left(open_rows, (n, -1))
        if at == len(open_rows):
            rows.append([i])
            room, r = capacity - n, len(rows) - 1
        else:
            room, r = open_rows.pop(at)
            rows[r].append(i)
            room -= n
        if room > 0:
            bisect.insort(open_rows, (room, r))
    return rows


class PackedChatRows:
    """Rows of each epoch's packing of a chat file's samples (`sample_ids`: which ones, default all;
    a held-out share for validation); row k of the run comes from the epoch it falls in. `window(k)`
    gives the row as [4, S]: input ids, labels, positions, and 1 on real tokens (0 on padding)."""

    def __init__(self, source: ChatSource, seq_len: int, seed: int, packing: str = "first_fit",
                 overlong: str = "refuse", sample_ids: Optional[np.ndarray] = None, shuffle: bool = True) -> None:
        if packing not in PACKINGS:
            raise ValueError(f"data.packing={packing!r}: choose one of {PACKINGS}")
        if overlong not in OVERLONG:
            raise ValueError(f"data.overlong={overlong!r}: choose one of {OVERLONG}")
        self.source, self.seq_len, self.seed, self.packing, self.shuffle = source, seq_len, seed, packing, shuffle
        self.sample_ids = np.arange(source.num_samples) if sample_ids is None else np.asarray(sample_ids)
        count = len(self.sample_ids)
        lengths = np.diff(np.asarray(source.offsets))[self.sample_ids]
        too_long = lengths > seq_len
        self.overlong_count, self.longest = int(too_long.sum()), int(lengths.max()) if len(lengths) else 0
        if self.overlong_count and overlong == "refuse":
            raise ValueError(f"{source.path}: {self.overlong_count} of {count} conversations are longer than "
                             f"train.seq_len={seq_len} tokens (the longest {self.longest}); raise train.seq_len, "
                             "or set data.overlong=truncate to cut them to it")
        if count < 1:
            raise ValueError(f"{source.path}: no conversations to pack")
        self.lengths = np.minimum(lengths, seq_len)
        self.targets = self._counted_targets(source, self.sample_ids, self.lengths)
        self._epochs: list[list[list[int]]] = []  # each epoch's rows, as positions into sample_ids
        self._starts = [0]  # run row where each epoch starts

    def _epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            n = len(self._epochs)
            order = np.arange(len(self.sample_ids))
            if self.shuffle:
                order = np.random.default_rng([self.seed, n]).permutation(order)
            pack = pack_first_fit if self.packing == "first_fit" else pack_best_fit
            rows = [[int(order[i]) for i in row] for row in pack(self.lengths[order].tolist(), self.seq_len)]
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        return self._epochs[e]

    def rows_in_epochs(self, epochs: float) -> int:
        """Rows of the run's first `epochs` epochs (a fraction takes that share of the last one)."""
        whole = int(epochs)
        self._epoch(whole - 1 if whole else 0)
        if epochs == whole:
            return self._starts[whole]
        return self._starts[whole] + int(round((epochs - whole) * len(self._epoch(whole))))

    @property
    def num_windows(self) -> int:
        """Rows of one epoch (the first: a reshuffled epoch may pack into a row more or fewer)."""
        return len(self._epoch(0))

    def _locate(self, k: int) -> tuple[int, int]:
        e = 0
        while True:
            rows = self._epoch(e)
            if k < self._starts[e] + len(rows):
                return e, k - self._starts[e]
            e += 1

    def window(self, k: int) -> torch.Tensor:
        """Row k of the run: [4, S] int64 (input ids, labels, positions, 1 on real tokens)."""
        e, r = self._locate(k)
        S = self.seq_len
        out = np.zeros((4, S), dtype=np.int64)
        out[1] = IGNORE_INDEX
        at = 0
        for index in self._epochs[e][r]:
            tokens, counts = self.source.sample(int(self.sample_ids[index]))
            tokens = np.asarray(tokens, dtype=np.int64)
            n = int(self.lengths[index])
            out[0, at:at + n] = tokens[:n]
            labels = np.where(counts[1:n] == 1, tokens[1:n], IGNORE_INDEX)
            out[1, at:at + n - 1] = labels
            out[2, at:at + n] = np.arange(n)
            at += n
        out[2, at:] = np.arange(S - at)  # the padding: a sample of its own, that no router counts
        out[3, :at] = 1
        return torch.from_numpy(out)

    def counted(self, k: int) -> int:
        """Targets that count in row k (its labels that are not IGNORE_INDEX), without reading it."""
        e, r = self._locate(k)
        return int(self.targets[self._epochs[e][r]].sum())

    @staticmethod
    def _counted_targets(source: ChatSource, sample_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Per sample, its counted targets: the counted tokens after its first (within `lengths`)."""
        starts = np.asarray(source.offsets)[sample_ids]
        counts = np.asarray(source.counts)
        if not len(counts):
            return np.zeros(len(sample_ids), dtype=np.int64)
        whole = np.add.reduceat(counts.astype(np.int64), np.asarray(source.offsets)[:-1])[sample_ids]
        out = whole - counts[starts]
        for i in np.nonzero(np.diff(np.asarray(source.offsets))[sample_ids] > lengths)[0]:  # truncated ones
            out[i] = int(counts[starts[i] + 1:starts[i] + lengths[i]].sum())
        return out

    @staticmethod
    def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[n, 4, S] rows -> (input ids, labels, positions, real tokens as bool), each [n, S]."""
        return rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3].bool()

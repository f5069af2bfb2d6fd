"""Training and validation data: packed windows of token streams, blended, sampled deterministically.

Packing: a token stream is cut into windows of seq_len + 1 tokens that start every seq_len tokens
(inputs and next-token labels), so sequences cross document boundaries at EOS and no token is
padding. Each source shuffles its windows per epoch with a seeded generator.

Blending (`data.blend=[[w, path], ...]`): sample g of the run comes from source i as that source's
k-th sample, where the samples of all sources are ordered by (2k + 1) / w_i (ties by source index):
a smooth interleaving whose counts stay within one sample of w_i x g at every prefix, as
Megatron-LM's greedy blending does (not the same order: this one has a closed form). Where a step
starts is found by a binary search on that order, so sample g is a pure function of (seed, g):
resuming at step s needs only s, in any layout.

Validation: `data.valid_path`, or the last `data.valid_fraction` of each source's windows, held
out of training; evaluation reads its first windows in order, the same ones every time.

Shape legend: B micro-batch, S sequence length.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from moetron.data.token_files import TokenSource, open_token_file, read_documents, read_header, tokenize_in_memory


def load_source(path: str, tokenizer) -> TokenSource:
    """`data.path`: "builtin" (the shipped corpus, tokenized here) or a token file's prefix."""
    if path == "builtin":
        from moetron.data.corpus import corpus_path

        tokens = tokenize_in_memory(read_documents(Path(str(corpus_path()))), tokenizer)
        return TokenSource(tokens, "the builtin corpus", int(tokens.max()) if len(tokens) else None)
    return open_token_file(path)


class PackedWindows:
    """Windows [first, first + count) of a stream's packed windows; window k of the run comes from
    epoch k // count, shuffled per epoch by `seed` (or in order, `shuffle=False`)."""

    def __init__(self, source: TokenSource, seq_len: int, seed: int, first: int = 0, count: Optional[int] = None,
                 shuffle: bool = True) -> None:
        total = (len(source.tokens) - 1) // seq_len
        self.source, self.seq_len, self.seed, self.first, self.shuffle = source, seq_len, seed, first, shuffle
        self.num_windows = total - first if count is None else count
        if self.num_windows < 1:
            raise ValueError(f"{source.path} has {len(source.tokens)} tokens: too few for train.seq_len={seq_len}")
        self._epoch, self._order = -1, None

    @classmethod
    def split(cls, source: TokenSource, seq_len: int, seed: int, valid_fraction: float):
        """(training windows, the held-out last `valid_fraction` of them, read in order)."""
        total = (len(source.tokens) - 1) // seq_len
        held = max(1, math.floor(total * valid_fraction))
        if total - held < 1:
            raise ValueError(f"{source.path}: {total} windows of train.seq_len={seq_len} leave none to train on after "
                             f"holding out data.valid_fraction={valid_fraction}; lower it or give data.valid_path")
        return cls(source, seq_len, seed, 0, total - held), cls(source, seq_len, seed, total - held, held, False)

    masking_eos: Optional[int] = None  # data.sample_masking: the EOS id that ends each document

    def split_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[n, S + 1] windows -> (inputs [n, S], next-token labels [n, S]), and under
        data.sample_masking the positions [n, S] of each document (restarting after each EOS)."""
        inputs, labels = rows[:, :-1], rows[:, 1:]
        if self.masking_eos is None:
            return inputs, labels
        return inputs, labels, document_positions(inputs, self.masking_eos)

    def window(self, k: int) -> torch.Tensor:
        """Tokens [S + 1] of this source's sample k."""
        epoch, pos = divmod(k, self.num_windows)
        if self.shuffle:
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._order = epoch, torch.randperm(self.num_windows, generator=gen)
            pos = int(self._order[pos])
        start = (self.first + pos) * self.seq_len
        return torch.from_numpy(np.asarray(self.source.tokens[start:start + self.seq_len + 1], dtype=np.int64))


class Blend:
    """Several sources with weights (one source: weight 1), interleaved as the module docstring says."""

    def __init__(self, parts: Sequence[PackedWindows], weights: Sequence[float], names: Sequence[str]) -> None:
        if len(parts) != len(weights) or not parts or any(w <= 0 for w in weights):
            raise ValueError(f"data.blend weights must be positive, one per source (got {list(weights)})")
        self.parts, self.names = list(parts), list(names)
        exact = [Fraction(w) for w in weights]  # exact: however small a weight, none rounds to 0
        scale = math.lcm(*(f.denominator for f in exact))
        integer = [int(f * scale) for f in exact]  # W_i, proportional to the weights
        period = math.lcm(*integer)
        self._spacing = [period // w for w in integer]  # D_i: sample k of source i sits at (2k + 1) x D_i
        self.weights = [w / sum(integer) for w in integer]
        self._cursor: tuple[int, list[int]] = (0, [0] * len(parts))  # (sample, counts before it): reading on needs no search

    def _placed_before(self, t: int) -> list[int]:
        """Per source, its samples whose position is below t."""
        return [((t - 1) // d + 1) // 2 if t > 0 else 0 for d in self._spacing]

    def counts_before(self, g: int) -> list[int]:
        """Per source, how many of the run's first g samples it gave."""
        if g == self._cursor[0]:
            return list(self._cursor[1])
        lo, hi = 0, (2 * g + 1) * min(self._spacing) + 1  # hi places more than g samples
        while hi - lo > 1:  # the last t placing at most g samples below it
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if sum(self._placed_before(mid)) <= g else (lo, mid)
        counts = self._placed_before(lo)
        for i, d in enumerate(self._spacing):  # samples exactly at lo, in source order
            if sum(counts) < g and lo % d == 0 and (lo // d) % 2 == 1:
                counts[i] += 1
        return counts

    def sources_of(self, g: int, n: int) -> list[tuple[int, int]]:
        """(source, its sample index) of the run's samples g .. g + n - 1."""
        counts = self.counts_before(g)
        picked = []
        for _ in range(n):
            i = min(range(len(counts)), key=lambda s: ((2 * counts[s] + 1) * self._spacing[s], s))
            picked.append((i, counts[i]))
            counts[i] += 1
        self._cursor = (g + n, counts)
        return picked

    def windows(self, g: int, n: int) -> torch.Tensor:
        """The run's samples g .. g + n - 1: [n, S + 1]."""
        return torch.stack([self.parts[i].window(k) for i, k in self.sources_of(g, n)])

    def shares(self, g: int, n: int) -> dict[str, float]:
        """Each source's share of the samples g .. g + n - 1 (logged per step)."""
        before, after = self.counts_before(g), self.counts_before(g + n)
        return {name: (a - b) / n for name, a, b in zip(self.names, after, before)}


class BatchSampler:
    """A step's micro-batches for one data-parallel rank, from a Blend."""

    def __init__(self, blend: Blend) -> None:
        self.blend = blend

    def micro_batches(self, first_sample: int, global_batch: int, micro_batch: int, dp_rank: int, dp: int):
        """This rank's micro-batches of the step whose `global_batch` sequences start at the run's
        sample `first_sample` (the tokens before it / seq_len): (inputs [B, S], labels [B, S]), and
        for packed chat rows their positions [B, S] (moetron.data.packing)."""
        per_rank = global_batch // dp
        first = first_sample + dp_rank * per_rank
        for m in range(per_rank // micro_batch):
            rows = self.blend.windows(first + m * micro_batch, micro_batch)
            yield self.blend.parts[0].split_rows(rows)

    @property
    def packed(self) -> bool:
        """Rows of packed samples with loss masks (chat data): the loss is normalised over the
        global batch's counted targets (`counted_targets`)."""
        return hasattr(self.blend.parts[0], "counted")

    def counted_targets(self, first_sample: int, global_batch: int) -> int:
        """Targets that count in the whole step's rows (every data rank's), read from the packing."""
        return sum(self.blend.parts[i].counted(k) for i, k in self.blend.sources_of(first_sample, global_batch))


    @classmethod
    def of_tokens(cls, tokens, seq_len: int, seed: int) -> "BatchSampler":
        """One token stream (an array, or a TokenSource) as a sampler."""
        source = tokens if isinstance(tokens, TokenSource) else TokenSource(np.asarray(tokens), "tokens")
        return cls(Blend([PackedWindows(source, seq_len, seed)], [1.0], ["data"]))


def document_positions(inputs_BS: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, S] positions within each document of the rows, restarting at the token after each EOS
    (where the token file's documents start) and at each row's start."""
    starts_BS = torch.zeros_like(inputs_BS, dtype=torch.bool)
    starts_BS[:, 0] = True
    starts_BS[:, 1:] = inputs_BS[:, :-1] == eos_id
    index_BS = torch.arange(inputs_BS.shape[1]).expand_as(inputs_BS)
    last_start_BS = torch.where(starts_BS, index_BS, 0).cummax(dim=1).values
    return index_BS - last_start_BS


def build_data(data_cfg, seq_len: int, seed: int, tokenizer, vocab_size: int):
    """(the training BatchSampler, the validation Blend or None) of the `data` settings: `data.path` or
    `data.blend`, every file checked against the tokenizer's and the model's vocabulary; validation
    from `data.valid_path`, or else the held-out `data.valid_fraction` of every source (held out
    whether or not a run evaluates, so that turning evaluation on or off never changes the training
    sequences)."""
    validation = bool(data_cfg.valid_path) or data_cfg.valid_fraction > 0
    blend = data_cfg.blend or [[1.0, data_cfg.path]]
    chat = [is_chat_file(str(path)) for _, path in blend]
    if any(chat):
        if not all(chat):
            raise ValueError(f"data.blend mixes chat files (moetron-data --chat) with plain token files: "
                             f"{[str(p) for (_, p), c in zip(blend, chat) if not c]}; fine-tune on chat data only")
        return _chat_data(data_cfg, blend, seq_len, seed, vocab_size)
    train, valid, names = [], [], []
    for weight, path in blend:
        source = load_source(str(path), tokenizer)
        source.check_vocab(vocab_size)
        names.append(str(path))
        if validation and not data_cfg.valid_path:
            part, held_out = PackedWindows.split(source, seq_len, seed, data_cfg.valid_fraction)
            train.append(part)
            valid.append(held_out)
        else:
            train.append(PackedWindows(source, seq_len, seed))
    weights = [float(w) for w, _ in blend]
    if validation and data_cfg.valid_path:
        source = load_source(data_cfg.valid_path, tokenizer)
        source.check_vocab(vocab_size)
        valid, weights_valid, names_valid = [PackedWindows(source, seq_len, seed, shuffle=False)], [1.0], \
            [data_cfg.valid_path]
    else:
        weights_valid, names_valid = weights, names
    for part in train + valid:  # pre-training packs documents without masks, unless asked (report 5.1)
        part.masking_eos = tokenizer.eos_id if data_cfg.sample_masking else None
    valid_blend = Blend(valid, weights_valid, names_valid) if valid else None
    return BatchSampler(Blend(train, weights, names)), valid_blend


def is_chat_file(path: str) -> bool:
    return path != "builtin" and read_header(path).get("kind") == "chat"


def _chat_data(data_cfg, blend, seq_len: int, seed: int, vocab_size: int):
    """Samplers of chat files: conversations packed into rows (moetron.data.packing), the held-out
    `data.valid_fraction` of each file's conversations (drawn by the seed, so that a file sorted by
    topic still validates on all of them) packed in order for validation."""
    from moetron.data.chat_files import open_chat_file
    from moetron.data.packing import PackedChatRows

    train, valid, names = [], [], []
    for _, path in blend:
        source = open_chat_file(str(path))
        source.check_vocab(vocab_size)
        held = math.floor(source.num_samples * data_cfg.valid_fraction) if not data_cfg.valid_path else 0
        if data_cfg.valid_fraction > 0 and not data_cfg.valid_path:
            held = max(held, 1)
            if held >= source.num_samples:
                raise ValueError(f"{path}: {source.num_samples} conversations leave none to train on after holding "
                                 f"out data.valid_fraction={data_cfg.valid_fraction}; lower it or give data.valid_path")
        rows = dict(packing=data_cfg.packing, overlong=data_cfg.overlong)
        order = np.random.default_rng([seed, 7919]).permutation(source.num_samples)  # held out: a seeded draw
        train.append(PackedChatRows(source, seq_len, seed, sample_ids=np.sort(order[held:]), **rows))
        if held:
            valid.append(PackedChatRows(source, seq_len, seed, sample_ids=np.sort(order[:held]), shuffle=False,
                                        **rows))
        names.append(str(path))
    weights = [float(w) for w, _ in blend]
    valid_blend = Blend(valid, weights, names) if valid else None
    if data_cfg.valid_path:
        source = open_chat_file(data_cfg.valid_path)
        source.check_vocab(vocab_size)
        valid_blend = Blend([PackedChatRows(source, seq_len, seed, shuffle=False, packing=data_cfg.packing,
                                            overlong=data_cfg.overlong)], [1.0], [data_cfg.valid_path])
    return BatchSampler(Blend(train, weights, names)), valid_blend

"""Packing conversations into rows (moetron.data.packing): first-fit and best-fit place every sample
once within the row length; a row's labels are each sample's next counted token (never across a
sample's end), its positions restart per sample; overlong samples are refused or cut, and counted."""
import numpy as np
import pytest
import torch

from moetron.data.chat_files import ChatSource
from moetron.data.packing import PackedChatRows, pack_best_fit, pack_first_fit
from moetron.models.common.linear_cross_entropy import IGNORE_INDEX


def _source(samples):
    """A ChatSource of (tokens, counts) pairs."""
    tokens = np.concatenate([np.asarray(t, dtype=np.uint16) for t, _ in samples])
    counts = np.concatenate([np.asarray(c, dtype=np.uint8) for _, c in samples])
    offsets = np.cumsum([0] + [len(t) for t, _ in samples]).astype(np.int64)
    return ChatSource(tokens, counts, offsets, "test.bin", int(tokens.max()))


def test_first_fit_and_best_fit_choose_rows_as_named():
    assert pack_first_fit([5, 6, 4], 10) == [[0, 2], [1]]  # the first row with room
    assert pack_best_fit([5, 6, 4], 10) == [[0], [1, 2]]  # the row it fills most tightly


@pytest.mark.parametrize("pack", [pack_first_fit, pack_best_fit])
def test_every_sample_lands_once_within_the_row_length(pack):
    lengths = np.random.default_rng(0).integers(1, 65, size=300).tolist()
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= 1.3 * sum(lengths) / 64  # dense: few rows beyond the lower bound


def test_a_row_holds_labels_and_positions_of_its_samples_only():
    samples = [([10, 11, 12, 13], [0, 0, 1, 1]),  # a prompt of 2 tokens, an answer of 2
               ([20, 21, 22], [0, 1, 1])]
    rows = PackedChatRows(_source(samples), seq_len=9, seed=0, shuffle=False)
    assert rows.num_windows == 1
    inputs, labels, positions, real = rows.window(0).tolist()
    assert inputs == [10, 11, 12, 13, 20, 21, 22, 0, 0]
    # a label is the next token when it counts; each sample's last position and the padding: ignored
    ign = IGNORE_INDEX
    assert labels == [ign, 12, 13, ign, 21, 22, ign, ign, ign]
    assert positions == [0, 1, 2, 3, 0, 1, 2, 0, 1]  # the padding is a sample of its own
    assert real == [1] * 7 + [0, 0]
    assert rows.counted(0) == 4


def test_overlong_samples_are_refused_or_cut_and_counted():
    samples = [([1] * 12, [0] * 6 + [1] * 6), ([2] * 4, [0, 1, 1, 1])]
    with pytest.raises(ValueError, match=r"1 of 2 conversations are longer than train.seq_len=8 .*longest 12.*"
                                         r"data.overlong=truncate"):
        PackedChatRows(_source(samples), seq_len=8, seed=0)
    rows = PackedChatRows(_source(samples), seq_len=8, seed=0, overlong="truncate", shuffle=False)
    assert rows.overlong_count == 1
    inputs, labels, _, _ = rows.window(0).tolist()
    assert inputs == [1] * 8 and labels == [IGNORE_INDEX] * 5 + [1, 1, IGNORE_INDEX]
    assert rows.counted(0) == 2  # the cut sample's targets within its first 8 tokens


def test_epochs_reshuffle_and_cover_every_sample():
    samples = [([i] * n, [1] * n) for i, n in enumerate(np.random.default_rng(1).integers(2, 9, size=40))]
    rows = PackedChatRows(_source(samples), seq_len=16, seed=3)
    per_epoch = rows.rows_in_epochs(1)
    assert rows.rows_in_epochs(2) >= 2 * per_epoch - 2
    first = [rows.window(k)[0].tolist() for k in range(per_epoch)]
    second = [rows.window(per_epoch + k)[0].tolist() for k in range(rows.rows_in_epochs(2) - per_epoch)]
    assert first != second  # reshuffled
    for epoch in (first, second):  # each sample's first token (its id) appears in exactly one row
        seen = sorted(t for row in epoch for t, prev in zip(row, [None] + row[:-1]) if t != prev and t != 0)
        assert seen == list(range(1, 40))


def test_pretraining_sample_masking_restarts_positions_after_each_eos():
    from moetron.data.windows import BatchSampler, document_positions

    inputs = torch.tensor([[5, 6, 9, 7, 9, 8], [9, 1, 2, 3, 4, 5]])
    assert document_positions(inputs, eos_id=9).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    sampler = BatchSampler.of_tokens(np.array([1, 2, 9, 3, 4, 5, 9, 6, 7] * 4), 8, 0)
    assert len(next(sampler.micro_batches(0, 2, 2, 0, 1))) == 2  # unmasked: (inputs, labels)
    sampler.blend.parts[0].masking_eos = 9
    inputs, labels, positions = next(sampler.micro_batches(0, 2, 2, 0, 1))
    assert torch.equal(positions, document_positions(inputs, 9)) and torch.equal(inputs[:, 1:], labels[:, :-1])

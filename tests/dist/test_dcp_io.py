"""Layout-independent checkpoint state: row shards saved by some ranks load into any other split of
the rows, on any number of ranks; a checkpoint's metadata never runs code."""
import io
import pickle

import pytest
import torch

from moetron.parallel.row_shards import RowShard
from moetron.checkpoint import dcp_io
from tests.dist.harness import run_ranks

WHOLE = torch.arange(30, dtype=torch.float32).view(10, 3)
REPLICATED = torch.tensor([1.5, -2.0])


def _split(rank: int, bounds: list[int]) -> RowShard:
    lo, hi = bounds[rank], bounds[rank + 1]
    return RowShard(WHOLE[lo:hi].clone(), lo, WHOLE.shape[0])


def _save(rank, world, folder, bounds):
    dcp_io.save_state(folder, {"w": _split(rank, bounds), "b": REPLICATED.clone(), "step": torch.tensor(7.0)})


def _load(rank, world, folder, bounds):
    target = _split(rank, bounds)
    target.local.zero_()
    state = {"w": target, "b": torch.zeros(2), "step": torch.tensor(0.0)}
    dcp_io.load_state(folder, state)
    return target.local, state["b"], state["step"]


@pytest.mark.parametrize("saved,loaded", [([0, 4, 10], [0, 2, 5, 9, 10]), ([0, 3, 6, 10], [0, 10])])
def test_row_shards_saved_in_one_split_load_into_another(tmp_path, saved, loaded):
    run_ranks(len(saved) - 1, _save, tmp_path / "ckpt", saved)
    results = run_ranks(len(loaded) - 1, _load, tmp_path / "ckpt", loaded)
    for rank, (rows, b, step) in enumerate(results):
        assert torch.equal(rows, WHOLE[loaded[rank]:loaded[rank + 1]])
        assert torch.equal(b, REPLICATED) and float(step) == 7.0
    whole = dcp_io.load_whole(tmp_path / "ckpt", "")
    assert torch.equal(whole["w"], WHOLE) and torch.equal(whole["b"], REPLICATED)


def test_a_gap_in_the_saved_rows_is_refused(tmp_path):
    with pytest.raises(Exception, match=r"w: the ranks' shards leave rows \[4, 10\) unsaved"):
        dcp_io.save_state(tmp_path / "ckpt", {"w": RowShard(WHOLE[:4].clone(), 0, 10)})


def test_a_shape_that_does_not_fit_names_the_tensor(tmp_path):
    dcp_io.save_state(tmp_path / "ckpt", {"w": WHOLE.clone()})
    with pytest.raises(Exception, match=r"w: the checkpoint holds \(10, 3\), this run \(12, 3\)"):
        dcp_io.load_state(tmp_path / "ckpt", {"w": RowShard(torch.zeros(6, 3), 6, 12)})


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_metadata_that_would_run_code_is_refused_without_running(tmp_path):
    dcp_io.save_state(tmp_path / "ckpt", {"w": WHOLE.clone()})
    marker = tmp_path / "ran"
    (tmp_path / "ckpt" / dcp_io.METADATA_FILE).write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(pickle.UnpicklingError, match="io.open is not allowed"):
        dcp_io.load_whole(tmp_path / "ckpt", "")
    assert not marker.exists()


class _ByGetattr:
    """Pickles as getattr(target, name), as Python 3.11.2 pickles an enum member."""

    def __init__(self, target, name: str) -> None:
        self.target, self.name = target, name

    def __reduce__(self):
        return (getattr, (self.target, self.name))


def test_enum_members_pickled_by_getattr_load_and_nothing_else_does(tmp_path):
    from torch.distributed.checkpoint.metadata import TensorProperties, _MEM_FORMAT_ENCODING

    member = _ByGetattr(_MEM_FORMAT_ENCODING, "TORCH_CONTIGUOUS_FORMAT")
    loaded = dcp_io._MetadataUnpickler(io.BytesIO(pickle.dumps(member))).load()
    assert loaded is _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    for target, name in ((TensorProperties, "__init__"), (_MEM_FORMAT_ENCODING, "__class__")):
        with pytest.raises(pickle.UnpicklingError, match="is not allowed"):
            dcp_io._MetadataUnpickler(io.BytesIO(pickle.dumps(_ByGetattr(target, name)))).load()

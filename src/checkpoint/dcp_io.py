"""Saving and loading layout-independent training state with torch.distributed.checkpoint (DCP).

The state is a flat dict of names to whole tensors or `RowShard`s (moetron.parallel.row_shards).
Every rank saves what it holds; a tensor several ranks hold (data-parallel replicas, DualPipe's two
copies of a stage) is written once. Every rank loads what it holds now, from whatever chunks the
writing layout left: DCP reads the overlapping parts of each saved chunk.

Loading never runs code from a file: DCP's own reader unpickles its `.metadata` file with plain
`pickle`, so `SafeReader` allows only the metadata classes DCP itself writes, and the state holds
tensors only (no pickled objects; the trainer's plain data lives in `trainer.pt`).
"""
from __future__ import annotations

import enum
import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem, metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                  TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from moetron.parallel.row_shards import RowShard

METADATA_FILE = ".metadata"  # DCP's index of a checkpoint folder: its presence marks the new format

_SAFE_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # Python 3.13's pickles
}


def _enum_member(cls, name: str):
    """What `getattr(cls, name)` gives, for members of the allowed enums only: some Python 3.11
    releases (3.11.2 here; not 3.11.7) pickle an enum member as getattr(its class, its name)."""
    if isinstance(cls, enum.EnumMeta) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not allowed in a checkpoint's {METADATA_FILE}")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _SAFE_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "builtins" and name == "getattr":  # only ever applied to classes allowed above
            return _enum_member
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's {METADATA_FILE}")


class SafeReader(filesystem.FileSystemReader):
    """DCP's file reader, whose metadata unpickles only DCP's own metadata classes."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        with (Path(self.path) / METADATA_FILE).open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f"{METADATA_FILE} holds no checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _chunk(obj) -> tuple[torch.Tensor, ChunkStorageMetadata, torch.Size]:
    """(local tensor, its chunk of the whole tensor, the whole tensor's shape)."""
    if isinstance(obj, RowShard):
        offsets = torch.Size((obj.row_offset,) + (0,) * (obj.local.ndim - 1))
        return obj.local, ChunkStorageMetadata(offsets=offsets, sizes=obj.local.shape), obj.global_shape
    if not torch.is_tensor(obj):
        raise TypeError(f"only tensors and RowShards go into a checkpoint's state, not {type(obj).__name__}")
    return obj, ChunkStorageMetadata(offsets=torch.Size((0,) * obj.ndim), sizes=obj.shape), obj.shape


class _RowShardSavePlanner(DefaultSavePlanner):
    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, obj in self.state_dict.items():
            local, chunk, shape = _chunk(obj)
            kind = WriteItemType.SHARD if isinstance(obj, RowShard) else WriteItemType.TENSOR
            items.append(WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=kind,
                                   tensor_data=TensorWriteData(chunk=chunk, size=shape,
                                                               properties=TensorProperties.create_from_tensor(local))))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        return _chunk(self.state_dict[index.fqn])[0]

    def create_global_plan(self, all_plans: list[SavePlan]):
        plans, metadata = super().create_global_plan(all_plans)
        _check_rows_covered(metadata)
        return plans, metadata


def _check_rows_covered(metadata: dcp_metadata.Metadata) -> None:
    """Every row of every tensor saved exactly once (the ranks' shards tile it)."""
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata) or len(md.size) == 0:
            continue
        end = 0
        for lo, hi in sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in md.chunks):
            if lo != end:
                raise ValueError(f"{fqn}: the ranks' shards leave rows [{end}, {lo}) unsaved or save them twice")
            end = hi
        if end != md.size[0]:
            raise ValueError(f"{fqn}: the ranks' shards leave rows [{end}, {md.size[0]}) unsaved")


class _RowShardLoadPlanner(DefaultLoadPlanner):
    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict, metadata=None, is_coordinator: bool = False) -> None:
        # the state as given: the default planner's set-up would replace RowShards (not tensors) by None
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        requests = []
        saved = self.metadata.state_dict_metadata
        for fqn, obj in self.state_dict.items():
            _, chunk, shape = _chunk(obj)
            if fqn not in saved:
                raise KeyError(f"the checkpoint has no {fqn}")
            if not isinstance(saved[fqn], TensorStorageMetadata) or saved[fqn].size != shape:
                size = getattr(saved[fqn], "size", "no tensor")
                raise ValueError(f"{fqn}: the checkpoint holds {tuple(size) if size != 'no tensor' else size}, "
                                 f"this run {tuple(shape)}")
            requests += create_read_items_for_chunk_list(fqn, saved[fqn], [chunk])
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return _chunk(self.state_dict[index.fqn])[0]

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise ValueError(f"{read_item.dest_index.fqn}: a checkpoint's state holds tensors only")


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _dcp(call, *args, **kwargs) -> None:
    """A DCP save or load, quiet about running in one process; its failure raised as the first failing
    rank's own exception (DCP wraps them in a CheckpointException, a BaseException, on every rank)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        try:
            call(*args, **kwargs)
        except CheckpointException as err:
            rank, (first, _) = min(err.failures.items())
            first.add_note(f"(on rank {rank})")
            raise first from None


def save_state(folder: Path, state: dict) -> None:
    """Every rank writes what it holds of `state` into `folder` (a collective over all ranks)."""
    _dcp(dcp.save, state, storage_writer=filesystem.FileSystemWriter(str(folder), sync_files=True),
         planner=_RowShardSavePlanner(), no_dist=_no_dist())


def load_state(folder: Path, state: dict) -> None:
    """Fill what this rank holds of `state` from `folder`, whatever layout wrote it (a collective)."""
    _dcp(dcp.load, state, storage_reader=SafeReader(str(folder)), planner=_RowShardLoadPlanner(), no_dist=_no_dist())


def saved_shapes(folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (whole shape, dtype) of every tensor in the checkpoint in `folder` (reads its metadata only)."""
    metadata = SafeReader(str(folder)).read_metadata()
    return {fqn: (md.size, md.properties.dtype) for fqn, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}


def load_whole(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with `prefix`, whole, in this process (names without the prefix)."""
    state = {fqn: torch.empty(size, dtype=dtype) for fqn, (size, dtype) in saved_shapes(folder).items()
             if fqn.startswith(prefix)}
    _dcp(dcp.load, state, storage_reader=SafeReader(str(folder)), planner=_RowShardLoadPlanner(), no_dist=True)
    return {fqn[len(prefix):]: t for fqn, t in state.items()}

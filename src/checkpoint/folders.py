"""Atomic checkpoints of a training run, the newest `keep` kept, corrupt ones skipped loudly.

Layout: <run dir>/checkpoints/step_00000050/{<parts>, COMPLETE}; what the parts are is the
writer's business (moetron.checkpoint.run_state: torch.distributed.checkpoint files and trainer.pt).
A checkpoint is written into a hidden temp folder, every file fsynced, the COMPLETE marker last,
then renamed into place: a crash leaves either the whole checkpoint or none under its final name.
Loading tries the newest complete checkpoint first (`complete_dirs`); one that fails to load is
reported with its path (`skip_corrupt`) and the next older one is tried. Only complete checkpoints
older than the newest `keep` are ever deleted; incomplete or corrupt folders are left for the user
to inspect.

Loading never runs code from a file: every part loads with `torch.load(weights_only=True)`
(tensors, numbers, strings and containers only). Checkpoints written before 2026-12-01 kept NumPy's
RNG state as an array; exactly the NumPy globals that rebuild a plain array are allowed for them.
A file that needs anything else is refused as corrupt, without running it.
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

MARKER = "COMPLETE"
# what a plain NumPy array needs to unpickle (the RNG state of older checkpoints); nothing callable else
_NUMPY_ARRAY_GLOBALS = [getattr(getattr(np, "_core", None) or np.core, "multiarray")._reconstruct, np.ndarray,
                        np.dtype, type(np.dtype(np.uint32))]
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_* folder under root, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def staging_dir(root: Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is committed (shared by all writing ranks)."""
    return root / f".tmp-step_{step:08d}"


def begin(root: Path, step: int) -> Path:
    """Create an empty staging folder for checkpoint `step` (one rank calls this)."""
    tmp = staging_dir(root, step)
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():  # left by a crashed attempt at the same step
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write(tmp: Path, parts: dict[str, Any]) -> None:
    """Write `parts` (name -> object for torch.save) into the staging folder, fsynced (any rank)."""
    for name, obj in parts.items():
        with (tmp / f"{name}.pt").open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def commit(root: Path, step: int, keep: int) -> Path:
    """Mark the staged checkpoint complete, rename it into place, prune to `keep` (one rank, last)."""
    tmp, final = staging_dir(root, step), root / f"step_{step:08d}"
    with (tmp / MARKER).open("w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step: keep the old one aside until the rename is done
        final.rename(root / f".replaced-step_{step:08d}-{os.getpid()}")
    os.rename(tmp, final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def save(root: Path, step: int, parts: dict[str, Any], keep: int) -> Path:
    """Single-writer checkpoint: stage, write, commit."""
    write(begin(root, step), parts)
    return commit(root, step, keep)


def _prune(root: Path, keep: int) -> None:
    complete = [(s, p) for s, p in step_dirs(root) if (p / MARKER).is_file()]
    for _, path in complete[keep:]:
        shutil.rmtree(path)
    for stale in root.glob(".replaced-step_*"):
        shutil.rmtree(stale)


def load_part(path: Path) -> Any:
    """One checkpoint file, without unpickling anything but tensors, plain data and NumPy arrays."""
    with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def complete_dirs(root: Path) -> Iterator[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under root, newest first; an incomplete one is
    reported and skipped (and left in place)."""
    for step, path in step_dirs(root):
        if (path / MARKER).is_file():
            yield step, path
        else:
            warnings.warn(f"skipping incomplete checkpoint {path} (no {MARKER} marker); it is left in place")


def skip_corrupt(path: Path, err: BaseException) -> None:
    warnings.warn(f"skipping corrupt checkpoint {path}: {type(err).__name__}: {err}; it is left in place")

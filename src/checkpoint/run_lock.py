"""One run per run directory: `<run dir>/.moetron.lock`, held with `flock` for the life of a run.

Two runs in one folder would each resume from its newest checkpoint and write the same
`metrics.jsonl` and checkpoint folders, losing one run's history. Rank 0 holds the lock from the
start of its run until it exits (before that, `moetron-train` probes it before Hydra writes into the
folder: moetron.train.preflight); the kernel frees it when the holder dies in any way (a crash, an
OOM kill, `kill -9`), so a lock is never stale. The file names its holder, for the message that
refuses a second run. On a network file system `flock` is as good as the mount's lock support
(NFSv4 has it; Lustre with `-o flock`, while `localflock` locks one node only); where the file
system refuses locks the run goes on without one, saying so.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = ".moetron.lock"


class RunDirInUse(Exception):
    """Another live run holds the run directory; the message names it."""


def _describe(run_dir: Path, text: str) -> str:
    try:
        who = json.loads(text)
        holder = (f"pid {who['pid']} on {who['host']} (its launcher: pid {who['parent_pid']}), started "
                  f"{who['started']}: {who['command']}")
    except (ValueError, KeyError, TypeError):
        holder = "another process"
    return (f"{run_dir} is in use by a run that is still alive: {holder}. Two runs in one folder would write over "
            "each other's metrics and checkpoints; wait for it to end (or stop it: Ctrl-C, or kill its launcher), "
            "or choose another hydra.run.dir")


class RunLock:
    """Holds `run_dir`'s lock from `acquire()` to `release()` (or the process's end)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock (and write who holds it) or raise RunDirInUse naming the holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # close-on-exec: not passed to programs it runs
        for attempt in range(20):  # a probe (holder_of) holds a shared lock for a moment only
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.1)
            except OSError:
                os.close(fd)
                raise
        else:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise RunDirInUse(_describe(self.run_dir, text))
        self._name_holder(fd)
        self._fd = fd
        return self

    @staticmethod
    def _name_holder(fd: int) -> None:
        holder = {"pid": os.getpid(), "parent_pid": os.getppid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def holder_of(run_dir: Path) -> Optional[str]:
    """The refusal message if a live run holds `run_dir`, else None. A shared lock for a moment: probes
    do not block each other; a file system that refuses locks is not probed."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _describe(Path(run_dir), os.pread(fd, 4096, 0).decode(errors="replace"))
    except OSError:
        return None
    finally:
        os.close(fd)

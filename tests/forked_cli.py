"""moetron's commands run as `python -m` runs them, on ranks forked from a warm process.

A subprocess imports torch, Hydra and moetron again: about 4 s of CPU each on this machine, N times
over for an N-rank torchrun job. A rank forked from multiprocessing's fork server, which imported
them once (PRELOAD), starts at once (the multi-rank harness, moetron.parallel.local_ranks, forks for
the same reason). Each rank gets what torchrun gives a worker (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), the command's arguments, working folder and
environment, stdout and stderr of its own (a job's output is its ranks' outputs in rank order, as
torchrun's merged console shows them), and runs the module as `python -m` does: its `__main__`,
with the working folder first on sys.path. Tests about launchers themselves (torchrun,
launch/train.sh, signals to a rank, the installed console scripts) start real processes.
"""
from __future__ import annotations

import atexit
import importlib
import multiprocessing as mp
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_child(module: str, args: list[str], cwd: Path, env: dict, out: str, err: str) -> None:
    """In the forked rank: become `python -m module args` and exit with its status (never returns)."""
    code = 1
    try:
        for fd, path in ((1, out), (2, err)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        extra_paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:0] = [str(cwd), *extra_paths]
        sys.argv = [module, *args]
        threads = env.get("OMP_NUM_THREADS")
        torch.set_num_threads(int(threads) if threads else os.cpu_count())
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as done:
            if done.code is None or isinstance(done.code, int):
                code = done.code or 0
            else:
                print(done.code, file=sys.stderr)
        except BaseException:  # as the interpreter would: the traceback on stderr, status 1
            traceback.print_exc()
    except BaseException:  # the rank could not start (a missing working folder): say why
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # what the interpreter runs at its exit (os._exit below would skip them)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


# imported once by the fork server, which forks every rank: none of them pays for these imports
PRELOAD = ["torch", "hydra", "omegaconf", "moetron.train.cli", "moetron.train.trainer", "moetron.train.export_cli",
           "moetron.data.cli", "moetron.plan.cli", "moetron.report.cli", "tests.forked_cli"]
_context = None


def _fork_server():
    """multiprocessing's fork server, preloaded with moetron. Ranks are forked from it rather than
    from the test process: the test process has used OpenMP's thread pool, and GNU OpenMP hangs in
    a child forked from a process whose pool ran (the fork server never computes)."""
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _read(path: str) -> str:
    """A rank's output so far ("" if it died before writing any)."""
    return Path(path).read_text(errors="replace") if os.path.exists(path) else ""


class _Rank:
    """A started rank, forked or spawned: `poll()` its exit status or None, `kill()`."""

    def __init__(self, process) -> None:
        self.process = process

    def poll(self):
        if isinstance(self.process, subprocess.Popen):
            return self.process.poll()
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()
        if isinstance(self.process, subprocess.Popen):
            self.process.wait()
        else:
            self.process.join()


class Job:
    """Ranks started by `start_module`: `pids`, `poll()`, and `finish()` for their outputs."""

    def __init__(self, module: str, args: list[str], cwd, nproc: int, env: dict, fork) -> None:
        self.args = [module, *args]
        self._tmp = tempfile.TemporaryDirectory()
        self.ranks, self.files = [], []
        port = free_port()
        for rank in range(nproc):
            rank_env = dict(env)
            if nproc > 1:
                rank_env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                                LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            out, err = os.path.join(self._tmp.name, f"{rank}.out"), os.path.join(self._tmp.name, f"{rank}.err")
            self.files.append((out, err))
            if fork:
                context = _fork_server() if fork != "here" else mp.get_context("fork")
                process = context.Process(target=_run_child, args=(module, args, Path(cwd), rank_env, out, err))
                process.start()
            else:
                with open(out, "w") as stdout, open(err, "w") as stderr:
                    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=rank_env,
                                               stdout=stdout, stderr=stderr)
            self.ranks.append(_Rank(process))

    @property
    def pids(self) -> list[int]:
        return [rank.process.pid for rank in self.ranks]

    def kill(self) -> None:
        """End every rank still running (a test that failed before `finish`)."""
        for rank in self.ranks:
            if rank.poll() is None:
                rank.kill()

    def poll(self):
        """None while every rank runs, else the status of the first that ended."""
        return next((code for code in (rank.poll() for rank in self.ranks) if code is not None), None)

    def finish(self, timeout: float = 600.0) -> subprocess.CompletedProcess:
        """Wait for every rank (see `_wait`); the worst status and the ranks' outputs in rank order."""
        codes = _wait(self.ranks, timeout)
        stdout = "".join(_read(out) for out, _ in self.files)
        stderr = "".join(_read(err) for _, err in self.files)
        self._tmp.cleanup()
        status = next((c for c in codes if c != 0), 0)
        return subprocess.CompletedProcess(self.args, status, stdout, stderr)


def start_module(module: str, args, cwd, nproc: int = 1, env_extra: dict | None = None, fork=True) -> Job:
    """`python -m module args` in `cwd` on `nproc` ranks, started and left running. `fork=False`
    starts each rank as a new interpreter instead (inductor's compile workers need one);
    `fork="here"` forks this process, which must not have computed anything (the command line below)."""
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    env.pop("PYTEST_CURRENT_TEST", None)
    return Job(module, [str(a) for a in args], cwd, nproc, env, fork)


def run_module(module: str, args, cwd, nproc: int = 1, env_extra: dict | None = None,
               timeout: float = 600.0, fork=True) -> subprocess.CompletedProcess:
    """`python -m module args` in `cwd` on `nproc` ranks, to their end: a CompletedProcess with the
    worst status of its ranks and their outputs in rank order."""
    return start_module(module, args, cwd, nproc, env_extra, fork).finish(timeout)


def _wait(ranks: list[_Rank], timeout: float) -> list[int]:
    """Each rank's exit status (minus the signal's number for a rank killed by one). Ranks still
    running past `timeout`, or 3 s after another rank failed (as torchrun ends a job whose rank
    failed, after a moment for the others to say why), are killed."""
    deadline, failed_at = time.monotonic() + timeout, None
    while True:
        codes = [rank.poll() for rank in ranks]
        if all(c is not None for c in codes):
            return codes
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        now = time.monotonic()
        if now > deadline or (failed_at is not None and now - failed_at > 3.0):
            for rank, code in zip(ranks, codes, strict=True):
                if code is None:
                    rank.kill()
            return [rank.poll() for rank in ranks]
        time.sleep(0.02)


def main(argv: list[str]) -> int:
    """`python -m tests.forked_cli --nproc_per_node=N -m MODULE ARGS...`: torchrun's command line
    for scripts that take a launcher (benchmarks/gpu/multi_gpu_check.sh's LAUNCHER), on forked ranks."""
    nproc, rest = 1, list(argv)
    while rest and rest[0] != "-m":
        flag = rest.pop(0)
        if flag.startswith("--nproc_per_node="):
            nproc = int(flag.split("=", 1)[1])
    module, args = rest[1], rest[2:]
    for name in PRELOAD:  # imported once here, then the ranks fork from this process, which computed nothing
        importlib.import_module(name)
    done = run_module(module, args, os.getcwd(), nproc, fork="here")
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

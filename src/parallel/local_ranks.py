"""Run a function on N gloo ranks forked on this machine and collect each rank's result (tests and
CPU benchmarks).

    results = run_ranks(world_size, fn, *args)   # fn(rank, world_size, *args) on every rank

Ranks are forked (about 40x faster to start than spawn on a small CPU) and meet through a FileStore
in a fresh temporary folder; the process group is up while `fn` runs. An exception on any rank
fails the call with that rank's traceback. Results travel as bytes (torch.save), so tensors survive
their worker.
"""
from __future__ import annotations

import io
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, store_path, fn, args, queue):
    try:
        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()  # tensors travel as bytes: shared-memory handles die with the worker
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report everything, including assertion errors, to the test process
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(world_size: int, fn, *args, timeout: float = 300.0):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, store_path, fn, args, queue)) for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, []
        try:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout)
                if status == "ok":
                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if errors else timeout)
                if p.is_alive():
                    p.kill()
        if errors:
            raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]

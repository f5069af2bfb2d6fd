"""Ranks from the launcher's environment (torchrun or SLURM) and process-group setup. Groups are
returned to the caller, never kept in globals."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID;
    inside a job of Hydra's submitit launcher, submitit's job environment says (from SLURM's
    variables under submitit_slurm, its own under submitit_local)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return World(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SUBMITIT_EXECUTOR" in env:
        import submitit
        job = submitit.JobEnvironment()
        return World(job.global_rank, job.num_tasks, job.local_rank)
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return World(0, 1, 0)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-010,012],cpu1" -> "gpu003"."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    # each bracket's first value: "rack[1-2]-node[01-04]" -> "rack1-node01"
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end])


def job_rendezvous(env=os.environ) -> Optional[tuple[str, str]]:
    """(address, port) where the ranks of a SLURM or submitit job meet when the launcher did not say:
    the job's first host, and a port derived from the job id (two jobs on one node do not collide)."""
    if "SUBMITIT_EXECUTOR" in env:
        import submitit
        job = submitit.JobEnvironment()
        job_id = env.get("SLURM_JOB_ID") or "".join(c for c in str(job.job_id) if c.isdigit()) or "0"
        return job.hostnames[0], str(20000 + int(job_id) % 10000)
    if "SLURM_JOB_NODELIST" in env and "SLURM_JOB_ID" in env:
        return first_host(env["SLURM_JOB_NODELIST"]), str(20000 + int(env["SLURM_JOB_ID"]) % 10000)
    return None


def pick_device(world: World) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(world: World, device: torch.device, timeout_s: float = 1800.0) -> Optional[dist.ProcessGroup]:
    """The world group (NCCL on GPUs, gloo on CPU), or None for a single process. A collective that
    waits on a peer longer than `timeout_s` (train.collective_timeout_s) fails instead of hanging."""
    if world.size == 1:
        return None
    found = job_rendezvous() if "MASTER_ADDR" not in os.environ else None
    if found:
        os.environ["MASTER_ADDR"] = found[0]
        os.environ.setdefault("MASTER_PORT", found[1])
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"{key} is not set: launch with torchrun, or export MASTER_ADDR and MASTER_PORT "
                               "(launch/slurm does) before srun")
    if device.type == "cuda":
        # bound to the device, NCCL sets up the communicators of every group as it is made (all ranks
        # alike, in order), rather than at its first collective in the middle of a schedule
        dist.init_process_group("nccl", rank=world.rank, world_size=world.size, device_id=device,
                                timeout=timedelta(seconds=timeout_s))
    else:
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD

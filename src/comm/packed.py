"""Many small tensors summed over ranks in one collective: the step's metrics (loss terms, idle
time, all-to-all bytes, the routers' loads and biases) travel as one flat float64 all-reduce."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def all_reduce_packed(parts: dict[str, torch.Tensor], group: Optional[dist.ProcessGroup] = None,
                      world_size: int = 1) -> dict[str, torch.Tensor]:
    """Each tensor summed over `group` (None: all ranks; nothing travels when `world_size` is 1) in
    one all-reduce, float64 on the device the tensors are on (NCCL reduces device tensors); returned
    on the host, names and shapes kept. Every rank passes the same keys and shapes."""
    if not parts:
        return {}
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in parts.values()])
    if world_size > 1:
        dist.all_reduce(flat, group=group)
    flat = flat.cpu()  # the step's one host sync for its metrics
    out, offset = {}, 0
    for name, t in parts.items():
        out[name] = flat[offset:offset + t.numel()].view(t.shape)
        offset += t.numel()
    return out

"""F&B pairs on one device: a stream per chunk, checked against autograd and timed.

DualPipeV on one pipeline rank holds both chunks of the V, so after warm-up every step is an F&B
pair of two different chunks: one micro-batch's forward on chunk A's stream beside another's
backward on chunk B's. This runs the schedule three ways on the same stage modules and data:

- reference: plain autograd, micro-batch after micro-batch;
- serial: the pipeline runner with `overlap=False` (the pair's halves one after the other);
- overlapped: the runner with F&B overlap (backward on a side thread, on its chunk's stream).

It checks that the three agree (losses and every gradient) and reports the step time of serial
and overlapped, and their ratio. No collectives, so it needs one device only; the exchange
overlap that DualPipe is for needs several GPUs. On a CPU the streams do nothing and the timing
says little; the agreement check still holds.

    python benchmarks/gpu/fb_streams.py --device cuda --json   # one GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from moetron.pipeline.builders import build_schedule
from moetron.pipeline.runtime import PipelineRunner


def make_chunk(hidden: int, layers: int) -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
                           for _ in range(layers)])


def make_data(n: int, rows: int, hidden: int, device):
    g = torch.Generator().manual_seed(7)
    inputs = {mb: torch.randn(rows, hidden, generator=g).to(device) for mb in range(n)}
    targets = {mb: torch.randn(rows, hidden, generator=g).to(device) for mb in range(n)}
    return inputs, targets


def reference_grads(chunks, inputs, targets):
    n = len(inputs)
    losses = {}
    for mb in range(n):
        out = inputs[mb]
        for chunk in chunks:
            out = chunk(out)
        loss = F.mse_loss(out, targets[mb])
        (loss / n).backward()
        losses[mb] = loss.detach()
    return losses


def run_pipeline(chunks, inputs, targets, overlap: bool, device, steps: int):
    """Run `steps` steps on fresh gradients; return the last step's losses and the step times."""
    sched = build_schedule("dualpipev", 1, len(inputs))
    runner = PipelineRunner(sched, 0, {0: chunks[0], 1: chunks[1]}, None, tuple(inputs[0].shape),
                            overlap=overlap, device=device)
    times, losses = [], {}
    for _ in range(steps):
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        sync(device)
        started = time.perf_counter()
        losses = runner.step(inputs, targets, F.mse_loss, loss_scale=1.0 / len(inputs)).losses
        sync(device)
        times.append(time.perf_counter() - started)
    return losses, times


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rel_diff(grads_a, grads_b) -> float:
    worst = 0.0
    for a, b in zip(grads_a, grads_b):
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return worst


def measure(device: torch.device, hidden: int, layers: int, rows: int, microbatches: int, steps: int) -> dict:
    torch.manual_seed(0)
    chunks = [make_chunk(hidden, layers).to(device) for _ in range(2)]
    inputs, targets = make_data(microbatches, rows, hidden, device)
    ref_chunks = copy.deepcopy(chunks)
    ref_losses = reference_grads(ref_chunks, inputs, targets)
    ref_grads = [p.grad for c in ref_chunks for p in c.parameters()]
    result = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
              "hidden": hidden, "layers_per_chunk": layers, "rows": rows, "microbatches": microbatches}
    for overlap in (False, True):
        mine = copy.deepcopy(chunks)
        losses, times = run_pipeline(mine, inputs, targets, overlap, device, steps)
        grads = [p.grad for c in mine for p in c.parameters()]
        name = "overlapped" if overlap else "serial"
        result[name] = {
            "step_s_median": sorted(times[1:] or times)[len(times[1:] or times) // 2],
            "loss_max_rel_diff": max(float((losses[mb] - ref_losses[mb]).abs() / ref_losses[mb].abs())
                                     for mb in ref_losses),
            "grad_max_rel_diff": max_rel_diff(grads, ref_grads),
        }
    result["overlapped_over_serial"] = result["overlapped"]["step_s_median"] / result["serial"]["step_s_median"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2, help="MLP blocks per chunk")
    parser.add_argument("--rows", type=int, default=4096, help="tokens per micro-batch")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(torch.device(args.device), args.hidden, args.layers, args.rows, args.microbatches, args.steps)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

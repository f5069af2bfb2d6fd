"""What sample masking costs: attention over packed samples (moetron.models.common.packed) against
plain causal attention, forward + backward, at MLA's head dims (q/k 192, v 128).

    python benchmarks/gpu/packed_attention.py --json               # a GPU: FlexAttention's block mask
    python benchmarks/gpu/packed_attention.py --device cpu --seq 1024 --heads 4 --steps 3

Rows hold samples of random lengths (mean `--mean-sample` tokens). Modes:
    causal        SDPA is_causal (FlashAttention on GPUs): what unpacked pre-training runs
    packed        packed_attention: FlexAttention with the block mask on GPUs, SDPA with a dense mask on CPUs
    packed_dense  SDPA with the dense [B, 1, S, S] mask (the CPU path), on any device
Prints milliseconds per forward + backward (median) and each mode's ratio to causal.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from moetron.models.common.packed import PackedSamples, packed_attention


def _lengths(seq: int, mean: int, gen: torch.Generator) -> list[int]:
    out = []
    while sum(out) < seq:
        out.append(int(torch.randint(max(mean // 4, 1), 2 * mean, (1,), generator=gen)))
    out[-1] -= sum(out) - seq
    return [n for n in out if n > 0]


def _time(fn, steps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=128)  # DeepSeek-V3's
    parser.add_argument("--mean-sample", type=int, default=600)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    samples = PackedSamples.of_lengths([_lengths(args.seq, args.mean_sample, gen) for _ in range(args.batch)], device)
    shape = (args.batch, args.heads, args.seq)
    q, k = (torch.randn(*shape, 192, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(*shape, 128, device=device, dtype=dtype, requires_grad=True)
    scale = 192 ** -0.5
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(attend):
        def step():
            out = attend()
            out.backward(torch.ones_like(out))
        return step

    modes = {
        "causal": run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)),
        "packed": run(lambda: packed_attention(q, k, v, scale, samples)),
        "packed_dense": run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=samples.visible(), scale=scale)),
    }
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "seq": args.seq,
              "batch": args.batch, "heads": args.heads, "mean_sample": args.mean_sample,
              "samples_per_row": int(samples.sample_ids_BS[:, -1].float().mean()), "ms": {}}
    for name, fn in modes.items():
        try:
            result["ms"][name] = round(_time(fn, args.steps, sync), 3)
        except Exception as err:  # noqa: BLE001 - report the mode that failed, go on
            result["ms"][name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    base = result["ms"]["causal"]
    result["vs_causal"] = {n: round(ms / base, 3) for n, ms in result["ms"].items() if isinstance(ms, float)}
    print(json.dumps(result, indent=1) if args.json else result)


if __name__ == "__main__":
    main()

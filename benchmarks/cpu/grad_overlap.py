"""Step time with and without overlapped gradient reduction (`parallel.overlap_grad_reduce`), on
this machine's gloo ranks: plain data parallelism, ZeRO-1, and a pipeline schedule with W actions.

    python benchmarks/cpu/grad_overlap.py [--steps 14] [--pairs 2]

Each layout runs the tiny model with the reduction after the backward (off) and overlapped (on),
alternating, and prints the median `step_time_s` of the steps after the first four and the ratio
on / off. On GPUs NCCL runs the collectives on streams of their own; that figure is measured by
benchmarks/gpu (owed where no GPU was lent).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {
    "dp2 (all-reduce)": (2, ["parallel.zero1=false"]),
    "dp2 ZeRO-1 (reduce-scatter)": (2, ["parallel.zero1=true"]),
    "pp2 x dp2 zb1p (all-reduce)": (4, ["parallel.pp=2", "parallel.schedule=zb1p", "parallel.zero1=false"]),
}
COMMON = ["model=tiny", "train.seq_len=64", "train.global_batch=16", "train.micro_batch=2", "logging.progress=false",
          "logging.wandb.mode=disabled", "train.ckpt_every=1000"]


def median_step_s(nproc: int, overrides: list[str], steps: int, run_dir: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "moetron.train", *COMMON, f"train.max_steps={steps}", *overrides, f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in rows[4:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    print("| layout | pair | off s | on s | on / off |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layout, (name, (nproc, overrides)) in enumerate(LAYOUTS.items()):
            for pair in range(args.pairs):
                times = {}
                for overlap in ("false", "true"):
                    run_dir = Path(tmp) / f"layout{layout}-pair{pair}-overlap_{overlap}"
                    times[overlap] = median_step_s(nproc, [*overrides, f"parallel.overlap_grad_reduce={overlap}"],
                                                   args.steps, run_dir)
                print(f"| {name} | {pair + 1} | {times['false']:.3f} | {times['true']:.3f} | "
                      f"{times['true'] / times['false']:.3f} |", flush=True)


if __name__ == "__main__":
    main()

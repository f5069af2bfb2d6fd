"""Context parallelism on this machine's gloo ranks: what one rank keeps for its backward
(`memory/activations_gib`, the saved-tensor accounting) and the step time, for long rows of the
tiny model (DeepSeek-V3-style: MLA, MTP), against data parallelism on the same two ranks.

    python benchmarks/cpu/context_parallel.py [--seq 2048] [--steps 8]

Layouts: one rank; cp=2 (two ranks share each row, exchanging MLA's latent); dp=2 (two ranks, each
its own rows). The same 4 rows per step in each. Prints the median of the steps after the first
three. On GPUs the gather runs over NVLink; that figure is owed to a multi-GPU machine.
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

LAYOUTS = {"1 rank": (1, []), "cp=2 (2 ranks, each half of every row)": (2, ["parallel.cp=2"]),
           "dp=2 (2 ranks, each its own rows)": (2, ["parallel.dp=2", "parallel.zero1=false"])}


def run(nproc: int, overrides: list[str], seq: int, steps: int, run_dir: Path) -> dict:
    common = ["model=tiny", f"train.seq_len={seq}", f"model.max_position_embeddings={seq}", "train.global_batch=4",
              "train.micro_batch=1", f"train.max_steps={steps}", "logging.progress=false",
              "logging.wandb.mode=disabled", "train.ckpt_every=1000", f"hydra.run.dir={run_dir}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "moetron.train", *common, *overrides]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][3:]
    return {key: statistics.median(r[key] for r in rows)
            for key in ("step_time_s", "throughput/tokens_per_s", "memory/activations_gib", "loss")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    print(f"rows of {args.seq} tokens, 4 per step\n| layout | step s | tokens/s | activations MiB per rank |\n"
          "|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (nproc, overrides)) in enumerate(LAYOUTS.items()):
            got = run(nproc, overrides, args.seq, args.steps, Path(tmp) / f"layout{i}")
            print(f"| {name} | {got['step_time_s']:.3f} | {got['throughput/tokens_per_s']:.0f} | "
                  f"{got['memory/activations_gib'] * 1024:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Compare the metrics of two training runs: loss curves (and throughput) of a parallel layout
against a reference run on the same data.

    python benchmarks/gpu/compare_runs.py REF_RUN_DIR RUN_DIR --rel 1e-4 [--json]

Exits 1 when a step's loss (or MTP loss) differs by more than `--rel` relative, or the steps differ.
Prints one JSON object: the largest relative differences and the median tokens/s of both runs
(steps after the first five).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-30)


def compare(reference: list[dict], other: list[dict], rel: float) -> dict:
    same_steps = [r["step"] for r in reference] == [r["step"] for r in other]
    worst = {key: max((_rel(a[key], b[key]) for a, b in zip(reference, other) if key in a and key in b), default=0.0)
             for key in ("loss", "loss/mtp")}
    speed = {name: statistics.median([r["throughput/tokens_per_s"] for r in rows[5:]] or [float("nan")])
             for name, rows in (("reference", reference), ("run", other))}
    return {"same_steps": same_steps, "max_rel_diff": worst, "tolerance": rel,
            "ok": same_steps and all(v <= rel for v in worst.values()),
            "median_tokens_per_s": speed, "speed_ratio": speed["run"] / speed["reference"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--rel", type=float, default=1e-4)
    args = parser.parse_args()
    result = compare(read_metrics(args.reference), read_metrics(args.run), args.rel)
    print(json.dumps({"reference": str(args.reference), "run": str(args.run), **result}))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()

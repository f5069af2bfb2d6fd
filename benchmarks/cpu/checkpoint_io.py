"""Checkpoint write and read time, one process: torch.distributed.checkpoint with layout-independent
names (what moetron-train writes) against one torch.save file per part (the per-rank format it
replaced), on the same model and AdamW state, in the same run.

    python benchmarks/cpu/checkpoint_io.py --repeats 3 model.hidden_size=1024 model.num_hidden_layers=4

Prints one JSON object: bytes written and min/median save and load seconds of each format.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moetron.models import build_model
from moetron.models.deepseek_v3 import load_preset
from moetron.parallel.row_shards import model_state, optimizer_state
from moetron.checkpoint import dcp_io


def _torch_save(folder: Path, model, optimizer) -> None:
    folder.mkdir()
    for name, obj in (("model", model.state_dict()), ("optim", optimizer.state_dict())):
        with (folder / f"{name}.pt").open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def _torch_load(folder: Path, model, optimizer) -> None:
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(folder / "optim.pt", weights_only=True))


class _NoSharding:
    sharded: list = []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="model.* overrides of the tiny preset")
    args = parser.parse_args()
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist([o.removeprefix("model.") for o in args.overrides]))
    model = build_model(load_preset("tiny", **overrides))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())

    def state():
        return {**model_state(model), **optimizer_state(model, optimizer, _NoSharding.sharded)}

    formats = {"dcp": (lambda f: dcp_io.save_state(f, state()), lambda f: dcp_io.load_state(f, state())),
               "torch_save": (lambda f: _torch_save(f, model, optimizer), lambda f: _torch_load(f, model, optimizer))}
    times = {name: {"save": [], "load": []} for name in formats}
    sizes = {}
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    try:
        for r in range(args.repeats):
            for name, (save, load) in formats.items():  # paired: both formats in every repeat
                folder = root / f"{name}-{r}"
                t0 = time.perf_counter()
                save(folder)
                t1 = time.perf_counter()
                load(folder)
                t2 = time.perf_counter()
                times[name]["save"].append(t1 - t0)
                times[name]["load"].append(t2 - t1)
                sizes[name] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {"params": params, "overrides": args.overrides, "repeats": args.repeats}
    for name, t in times.items():
        out[name] = {"bytes": sizes[name], **{f"{k}_s_min": min(v) for k, v in t.items()},
                     **{f"{k}_s_median": statistics.median(v) for k, v in t.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

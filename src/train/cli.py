"""`moetron-train` (also `python -m moetron.train`): the Hydra application that trains a model.

    moetron-train model=tiny train.max_steps=30 hydra.run.dir=outputs/tiny
    torchrun --nproc_per_node=2 -m moetron.train model=tiny
    moetron-train -m model=tiny optim.lr=1e-3,3e-3
    moetron-train --check --world-size 2 model=tiny      # every check, in one process, then exit

A single run's command line is composed and checked once before Hydra starts (moetron.train.preflight).

The run directory is Hydra's output folder: .hydra/, metrics.jsonl, checkpoints/, wandb/.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moetron.train.config import register_configs

register_configs()


def main() -> None:
    """Check the command line once (moetron.train.preflight), then Hydra's app; `--check`: only check."""
    from moetron.core.errors import UserInputError
    from moetron.train.distributed import world_from_env
    from moetron.train.interrupts import remember_launcher
    from moetron.train.preflight import hydra_runs_it_otherwise, preflight, split_argv, world_size_for_check

    remember_launcher()  # before anything slow: a launcher that dies from here on is noticed
    is_main = world_from_env().is_main  # torchrun's RANK or SLURM's SLURM_PROCID
    try:
        check, world_size, overrides = split_argv(sys.argv[1:])
        if check or not hydra_runs_it_otherwise(overrides):
            summary = preflight(overrides, world_size_for_check(world_size), full=check, probe_lock=is_main)
    except UserInputError as err:
        if is_main:  # every rank of a job finds the same mistake: say it once
            print(f"moetron-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    if check:
        print(f"moetron-train: {summary}", flush=True)
        sys.exit(0)
    sys.argv = [sys.argv[0], *overrides]
    run()


@hydra.main(version_base="1.3", config_path="pkg://moetron.conf", config_name="config")
def run(cfg: DictConfig) -> float:
    from moetron.train.distributed import world_from_env
    from moetron.train.interrupts import TrainingStopped
    from moetron.core.errors import UserInputError
    from moetron.train.trainer import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = train(cfg, run_dir)
    except UserInputError as err:
        if world_from_env().is_main:  # every rank finds the same mistake: say it once
            print(f"moetron-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as err:
        print(f"moetron-train: rank {world_from_env().rank}: stopped: {err}", file=sys.stderr)
        sys.exit(3)
    return float(metrics.get("loss", float("nan")))  # the sweep objective


if __name__ == "__main__":
    main()

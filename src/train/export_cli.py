"""`moetron-export RUN_DIR --hf OUT_DIR`: the newest complete checkpoint of a run as a Hugging Face
folder (config.json + safetensors that transformers' DeepseekV3ForCausalLM loads; MTP weights in
their own file), whatever the parallel layout that wrote it: its tensors are read whole. Checkpoints
in the per-rank format of before 2026-12-02 export too (their shards are merged), which is how
they move to this version.

    moetron-export outputs/quickstart --hf exported/quickstart
    moetron-train model.init_from=exported/quickstart ...        # start a run from it
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from moetron.parallel.materialize import merge_shards
from moetron.parallel.row_shards import MODEL_PREFIX
from moetron.checkpoint import dcp_io, folders
from moetron.train.validate import model_config


def newest_complete(run_dir: Path) -> Path:
    for _, path in folders.complete_dirs(run_dir / "checkpoints"):
        return path
    raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'}")


def export(run_dir: Path, out_dir: Path) -> Path:
    """Write the whole model of the newest complete checkpoint under `run_dir` to `out_dir`."""
    step_dir = newest_complete(run_dir)
    cfg = OmegaConf.create(folders.load_part(step_dir / "trainer.pt")["config"])
    spec, model_cfg = model_config(cfg)
    model = spec.build(model_cfg)
    if (step_dir / dcp_io.METADATA_FILE).is_file():
        model.load_state_dict(dcp_io.load_whole(step_dir, MODEL_PREFIX))
    else:
        model.load_state_dict(_merge_per_rank_files(step_dir, model))
    spec.save_hf(model.eval(), out_dir)
    return step_dir


def _merge_per_rank_files(step_dir: Path, model) -> dict:
    """The whole model from a checkpoint of before 2026-12-02: one model-[pp<i>][-ep<j>].pt per rank."""
    whole_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shards = []
    for path in sorted(step_dir.glob("model*.pt")):
        ep = re.search(r"-ep(\d+)", path.stem)
        shards.append((folders.load_part(path), int(ep.group(1)) if ep else 0))
    return merge_shards(shards, whole_shapes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moetron-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a moetron-train run directory (it holds checkpoints/)")
    parser.add_argument("--hf", type=Path, required=True, metavar="OUT_DIR", help="the Hugging Face folder to write")
    args = parser.parse_args(argv)
    try:
        step_dir = export(args.run_dir, args.hf)
    except (FileNotFoundError, ValueError, KeyError, NotImplementedError, ImportError) as err:
        print(f"moetron-export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {step_dir} to {args.hf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

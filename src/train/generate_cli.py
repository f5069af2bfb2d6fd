"""`moetron-generate SOURCE --prompt TEXT ...`: completions from a run's newest checkpoint or a Hugging
Face folder, sampled with a KV cache (moetron.models.generate), printed one per prompt.

    moetron-generate outputs/sft --chat --prompt "What is 12 + 30?"            # a run: its tokenizer
    moetron-generate exported/quickstart --prompt "The module" --max-new-tokens 64 --temperature 0.8
    moetron-generate hf_folder/ --prompts prompts.jsonl --tokenizer hf_folder/  # {"prompt": ...} per line

`--chat` renders each prompt as a user turn with the tokenizer's chat template and its generation
prompt (moetron.data.chat); a completion ends at EOS or after `--max-new-tokens`. One process, on the
GPU when there is one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moetron.checkpoint import dcp_io, folders
from moetron.data.chat import ChatTemplate
from moetron.data.tokenizers import get_tokenizer
from moetron.models import from_hf_folder
from moetron.models.generate import generate
from moetron.parallel.row_shards import MODEL_PREFIX
from moetron.train.export_cli import newest_complete
from moetron.train.validate import model_config


def load_source(source: Path, device: torch.device):
    """(model in eval mode on `device`, the tokenizer name it trained with) of a run directory or a
    Hugging Face folder."""
    if (source / "checkpoints").is_dir():
        step_dir = newest_complete(source)
        cfg = OmegaConf.create(folders.load_part(step_dir / "trainer.pt")["config"])
        spec, model_cfg = model_config(cfg)
        model = spec.build(model_cfg)
        model.load_state_dict(dcp_io.load_whole(step_dir, MODEL_PREFIX))
        return model.to(device).eval(), cfg.data.tokenizer
    if (source / "config.json").is_file():
        model = from_hf_folder(source)
        return model.to(device).eval(), str(source) if (source / "tokenizer.json").is_file() else "bytes"
    raise FileNotFoundError(f"{source}: neither a run directory (checkpoints/) nor a Hugging Face folder (config.json)")


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        for line_no, line in enumerate(args.prompts.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{args.prompts}:{line_no}: expected {{\"prompt\": ...}} ({err})") from err
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    return prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moetron-generate", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a moetron-train run directory, or a Hugging Face folder")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts", type=Path, help='a JSONL file of {"prompt": ...}')
    parser.add_argument("--tokenizer", help="bytes or a Hugging Face tokenizer (default: the run's / the folder's)")
    parser.add_argument("--chat", action="store_true", help="each prompt as a user turn of the chat template")
    parser.add_argument("--chat-template", help="a Jinja chat template file, in place of the tokenizer's own")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, trained_with = load_source(args.source, device)
        tokenizer = get_tokenizer(args.tokenizer or trained_with)
        texts = _prompts(args)
        if args.chat:
            template = ChatTemplate.of_tokenizer(tokenizer, args.chat_template)
            texts = [template.render([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
            ids = [tokenizer.encode_with_offsets(t)[0].tolist() for t in texts]
        else:
            ids = [tokenizer.encode(t).tolist() for t in texts]
        completions = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p, [tokenizer.eos_id],
                               torch.Generator(device=device).manual_seed(args.seed))
    except (FileNotFoundError, ValueError, KeyError, NotImplementedError, ImportError) as err:
        print(f"moetron-generate: error: {err}", file=sys.stderr)
        return 2
    for completion in completions:
        text_ids = completion[:-1] if completion and completion[-1] == tokenizer.eos_id else completion
        print(json.dumps({"completion": tokenizer.decode(text_ids)}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

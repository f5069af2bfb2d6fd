"""GRPO on the shipped sums task, `tiny` on CPU: does the reward rise above what the fine-tuned
model already earns? (issue 28; the commands are the README's GRPO section, at full length)

    python benchmarks/cpu/grpo_sums.py [--steps 300] [--lr 3e-4] [--out DIR] [--json]

1. SFT on answered sums ("What is 23 + 58?" -> "23 + 58 = 81.", 8,000 questions of seed 1, four
   epochs), exported as a Hugging Face folder;
2. GRPO from it (`stage=grpo`, rewards exact_answer + near_answer + answer_format) for --steps steps;
3. a control from the same folder with optim.lr=1e-30 (Adam moves no float32 weight): the same
   prompts and the same per-completion seeds, so its rewards are the fine-tuned model's on exactly
   what GRPO was asked, step by step;
4. greedy exact accuracy on 200 held-out questions (seed 7) before and after.

Printed: the mean reward of both runs per 50 steps, the difference over the last 50, and the
held-out accuracy; the GRPO run's folder gets `moetron-report`'s rewards.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REWARDS = "rl.reward=[moetron.rl.task:exact_answer,moetron.rl.task:near_answer,moetron.rl.task:answer_format]"
GRPO = ["model=tiny", "stage=grpo", "rl.group_size=8", "rl.prompts_per_step=16", "rl.max_new_tokens=24", "rl.beta=0",
        REWARDS, "train.micro_batch=32", "logging.progress=false", "logging.wandb.mode=disabled",
        "train.ckpt_every=100000"]
SFT = ["model=tiny", "stage=sft", "train.seq_len=256", "train.global_batch=16", "train.micro_batch=16",
       "train.epochs=4", "optim.lr=3e-3", "optim.warmup_steps=20", "logging.progress=false",
       "logging.wandb.mode=disabled"]


def sh(*args: str) -> str:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, *args], check=True, env=env, capture_output=True, text=True).stdout


def rewards(run_dir: Path) -> list[float]:
    return [json.loads(line)["rl/reward_mean"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def accuracy(source: Path, questions: Path) -> float:
    """Greedy exact answers of `source` (a run or a folder) on the questions of `questions`."""
    from moetron.rl.task import exact_answer

    lines = sh("-m", "moetron.train.generate_cli", str(source), "--prompts", str(questions), "--chat",
               "--max-new-tokens", "24").splitlines()
    examples = [json.loads(line) for line in questions.read_text().splitlines()]
    completions = [json.loads(line)["completion"] for line in lines]
    right = exact_answer([e["prompt"] for e in examples], completions, [e["answer"] for e in examples])
    return sum(right) / len(right)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="grpo_sums_"))
    out.mkdir(parents=True, exist_ok=True)
    sh("-m", "moetron.rl.task", "--output", str(out / "sums_chat.jsonl"), "--chat", "--count", "8000", "--seed", "1")
    sh("-m", "moetron.rl.task", "--output", str(out / "held_out.jsonl"), "--count", "200", "--seed", "7")
    sh("-m", "moetron.data.cli", str(out / "sums_chat.jsonl"), "--chat", "--output", str(out / "sums_chat"),
       "--workers", "1")
    sh("-m", "moetron.train", *SFT, f"data.path={out / 'sums_chat'}", f"hydra.run.dir={out / 'sft'}")
    sh("-m", "moetron.train.export_cli", str(out / "sft"), "--hf", str(out / "sft_hf"))
    for name, lr in (("grpo", args.lr), ("control", 1e-30)):
        sh("-m", "moetron.train", *GRPO, f"model.init_from={out / 'sft_hf'}", f"train.max_steps={args.steps}",
           f"optim.lr={lr}", f"hydra.run.dir={out / name}")
    sh("-m", "moetron.report.cli", str(out / "grpo"))
    trained, control = rewards(out / "grpo"), rewards(out / "control")
    windows = [(a, min(a + 50, args.steps)) for a in range(0, args.steps, 50)]
    mean = lambda values, a, b: sum(values[a:b]) / (b - a)  # noqa: E731
    result = {
        "steps": args.steps, "lr": args.lr, "out": str(out),
        "per_50_steps": [{"steps": f"{a + 1}-{b}", "grpo": mean(trained, a, b), "control": mean(control, a, b)}
                         for a, b in windows],
        "last_50_gain": mean(trained, args.steps - 50, args.steps) - mean(control, args.steps - 50, args.steps),
        "held_out_exact_sft": accuracy(out / "sft_hf", out / "held_out.jsonl"),
        "held_out_exact_grpo": accuracy(out / "grpo", out / "held_out.jsonl"),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for row in result["per_50_steps"]:
        print(f"steps {row['steps']:>9}: reward {row['grpo']:.3f} (GRPO) against {row['control']:.3f} (not trained)")
    print(f"last 50 steps: +{result['last_50_gain']:.3f}; held-out greedy exact answers "
          f"{result['held_out_exact_sft']:.1%} -> {result['held_out_exact_grpo']:.1%}; report in {out / 'grpo' / 'report'}")


if __name__ == "__main__":
    main()

"""The figures of a run report, each drawn from metrics.jsonl records (headless matplotlib).

Every function takes the records (one dict per logged step) and a path, writes one PNG and returns
the data it drew, so that a test can hold the picture to the run: the heatmap's rows are the logged
tokens per expert, the curves the logged values.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from moetron.plotting import save_figure, use_agg

LOSSES = ("loss", "loss/lm", "loss/mtp", "eval/loss")
BALANCE = ("loss/seq_aux", "loss/aux")  # the sequence-wise loss; the auxiliary loss (balance_mode=aux_loss)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` where it was logged."""
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def layer_keys(records: list[dict], prefix: str) -> list[tuple[int, str]]:
    """(layer, key) of the per-layer metrics `prefix`layer_<i>, in layer order."""
    found = {k for r in records for k in r if k.startswith(prefix)}
    layers = [(int(m.group(1)), k) for k in found if (m := re.fullmatch(re.escape(prefix) + r"layer_(\d+)", k))]
    return sorted(layers)


def losses(records: list[dict], path) -> dict:
    """Total, LM, MTP and validation losses; the sequence balance loss on its own axis (log)."""
    plt = use_agg()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = {}
    for key in LOSSES:
        steps, values = series(records, key)
        if steps:
            left.plot(steps, values, label=key, marker="o" if key == "eval/loss" else None, markersize=3)
            drawn[key] = values
    left.set(xlabel="step", ylabel="loss", title="losses")
    left.legend(fontsize=8)
    for key in BALANCE:
        steps, values = series(records, key)
        if steps:
            right.plot(steps, values, label=key)
            if min(values) > 0:
                right.set_yscale("log")
            drawn[key] = values
    right.set(xlabel="step", title="balance losses")
    right.legend(fontsize=8)
    save_figure(fig, path)
    return drawn


def throughput(records: list[dict], path) -> dict:
    """Tokens per second and MFU over steps."""
    plt = use_agg()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    steps, tokens = series(records, "throughput/tokens_per_s")
    ax.plot(steps, tokens, color="tab:blue")
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    mfu_steps, mfu = series(records, "throughput/mfu")
    twin = ax.twinx()
    twin.plot(mfu_steps, [100 * v for v in mfu], color="tab:orange", alpha=0.7)
    twin.set_ylabel("MFU (%)", color="tab:orange")
    save_figure(fig, path)
    return {"tokens_per_s": tokens, "mfu": mfu}


def maxvio(records: list[dict], path) -> dict:
    """MaxVio of each MoE layer over steps, and their mean."""
    plt = use_agg()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    drawn = {}
    for layer, key in layer_keys(records, "moe/maxvio_batch/"):
        steps, values = series(records, key)
        ax.plot(steps, values, linewidth=0.8, alpha=0.6, label=f"layer {layer}")
        drawn[layer] = values
    steps, mean = series(records, "moe/maxvio_batch")
    ax.plot(steps, mean, color="black", linewidth=2, label="mean")
    ax.set(xlabel="step", ylabel="MaxVio", title="load imbalance per MoE layer (MaxVio)")
    ax.legend(fontsize=7, ncol=4)
    save_figure(fig, path)
    return drawn


def load_matrix(records: list[dict], step: Optional[int] = None, prefix: str = "moe/load/"
                ) -> tuple[list[int], list[list[float]]]:
    """(layers, tokens per expert of each layer): at `step`, or summed over every logged step
    (`prefix`: moe/rollout_load/ for GRPO's loads while sampling)."""
    rows = layer_keys(records, prefix)
    chosen = [r for r in records if step is None or r["step"] == step]
    if not chosen:
        raise ValueError(f"step {step} was not logged")
    matrix = []
    for _, key in rows:
        loads = [r[key] for r in chosen if key in r]
        matrix.append([float(sum(col)) for col in zip(*loads)] if loads else [])
    return [layer for layer, _ in rows], matrix


def moving_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window` - 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def rewards(records: list[dict], path) -> dict:
    """GRPO: the mean reward (its moving mean over 20 logged steps, and each reward function's
    mean); the KL to the reference, the clip fraction, the entropy and the distance between the
    experts' loads while sampling and in training."""
    plt = use_agg()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps, mean = series(records, "rl/reward_mean")
    drawn = {"rl/reward_mean": mean, "moving_mean": moving_mean(mean, 20)}
    left.plot(steps, mean, color="tab:blue", alpha=0.35, linewidth=0.8, label="reward (mean of the step)")
    left.plot(steps, drawn["moving_mean"], color="tab:blue", linewidth=2, label="moving mean, 20 steps")
    for key in sorted({k for r in records for k in r if k.startswith("rl/reward/")}):
        part_steps, values = series(records, key)
        left.plot(part_steps, moving_mean(values, 20), linewidth=1, label=key.removeprefix("rl/reward/"))
        drawn[key] = values
    left.set(xlabel="step", ylabel="reward", title="rewards")
    left.legend(fontsize=7)
    for key in ("rl/kl", "rl/clip_fraction", "rl/entropy", "moe/rollout_vs_train"):
        key_steps, values = series(records, key)
        if key_steps:
            right.plot(key_steps, values, linewidth=1, label=key)
            drawn[key] = values
    right.set(xlabel="step", title="policy: KL to the reference, clipping, entropy, routes")
    right.legend(fontsize=7)
    save_figure(fig, path)
    return drawn


def heatmap(layers: list[int], matrix: list[list[float]], path, title: str) -> Path:
    """Tokens per expert as a layers x experts heatmap."""
    plt = use_agg()
    experts = max((len(row) for row in matrix), default=0)
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.12 * experts + 2), 1.2 + 0.35 * len(layers)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set(xlabel="expert", title=title)
    fig.colorbar(image, ax=ax, label="tokens")
    return save_figure(fig, path)


def bias(records: list[dict], path) -> dict:
    """Each expert's routing bias per layer at the last logged step (loss-free balancing)."""
    plt = use_agg()
    last = next((r for r in reversed(records) if any(k.startswith("moe/bias/") for k in r)), None)
    rows = [(layer, last[key]) for layer, key in layer_keys([last], "moe/bias/")] if last else []
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * max(len(rows), 1)))
    if rows:
        limit = max(abs(v) for _, row in rows for v in row) or 1.0
        image = ax.imshow([row for _, row in rows], aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit,
                          interpolation="nearest")
        ax.set_yticks(range(len(rows)), [f"layer {i}" for i, _ in rows])
        fig.colorbar(image, ax=ax, label="bias")
    ax.set(xlabel="expert", title=f"routing bias per expert at step {last['step'] if last else '-'}")
    save_figure(fig, path)
    return dict(rows)


def bubble(records: list[dict], path) -> dict:
    """The measured pipeline bubble ratio over steps."""
    plt = use_agg()
    fig, ax = plt.subplots(figsize=(8, 3))
    steps, values = series(records, "pipeline/bubble_ratio")
    ax.plot(steps, [100 * v for v in values])
    ax.set(xlabel="step", ylabel="bubble (%)", title="pipeline bubble (idle share of the step)")
    save_figure(fig, path)
    return {"bubble_ratio": values}

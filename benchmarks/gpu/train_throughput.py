"""Single-device training throughput: moetron eager, compiled and FP8 against transformers'
DeepseekV3ForCausalLM, on the same config, data and weights (moved across with `to_hf`).

    python benchmarks/gpu/train_throughput.py --json                            # an H200: mini, seq 2048, mb 4
    python benchmarks/gpu/train_throughput.py --device cpu --model tiny --seq 128 --micro-batch 2 \\
        --steps 4 --warmup 1 --json                                             # the CPU check CI runs

Each candidate trains `warmup` + `steps` steps (forward, loss, backward, AdamW, zero_grad) on the
same token batches from the same initial weights; tokens/s counts the timed steps. The model has no
MTP module here (transformers' has none), so both do the same work.

FLOPs per token: moetron's `training_flops_per_token` = 3 x (2 x activated matmul parameters,
output head included, embedding lookups excluded, + causal attention 2 * S * heads * (qk_head +
v_head) / 2 per layer): 2.18 GFLOP per token for `mini` at S=2048 (../shared/reference). Model
TFLOP/s = tokens/s x that. GEMM-relative utilisation (`mfu_vs_gemm`, printed "of GEMM peak") is that
over a dense GEMM timed in the same run (bf16 8192^3 on a GPU, float32 2048^3 on a CPU), so it says
how close to the GEMM rate the step gets. It is not the trainer's MFU: `throughput/mfu` in a run's
metrics divides by the cluster's datasheet peak, `cluster.peak_tflops`.
Precision: BF16 autocast over FP32 parameters on a GPU (all candidates alike), float32 on a CPU.
Peak memory: each candidate's own peak on a GPU; on a CPU the process's largest resident size so far
(not per candidate). The FP8 candidate is the `auto` backend: torch's blockwise GEMM on Hopper, the
emulated reference (slow by design) elsewhere.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_tflops(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    start, reps = time.perf_counter(), 10 if device.type == "cuda" else 3
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def _hf_loss(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _ours_loss(model, ids):
    """moetron's models take labels aligned with their inputs: the next token, none for the last."""
    from moetron.models.common.decoder_lm import IGNORE_INDEX
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    return model(ids, labels).loss


def train_rate(model, loss_fn, batches, warmup: int, device, autocast_dtype) -> dict:
    """Tokens/s over the timed steps, the losses of every step, and peak memory."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    losses, start = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, ids in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with cast:
            loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(b.numel() for b in batches[warmup:])
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"tokens_per_s": tokens / seconds, "losses": [float(v) for v in losses], "peak_gib": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="mini")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--candidates", nargs="*", default=["transformers", "eager", "compiled", "fp8"])
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for the compiled candidate (aot_eager: traced, no code generated)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    try:
        import transformers
    except ImportError:  # the lent GPU machine may lack it: moetron's candidates still run
        transformers = None
        args.candidates = [c for c in args.candidates if c != "transformers"]
        print("transformers is not installed: its candidate is left out", file=sys.stderr)

    from moetron.models import build_model
    from moetron.models.deepseek_v3 import load_preset
    from moetron.models.deepseek_v3.params import training_flops_per_token
    from moetron.models.common.parallelize import parallelize
    from moetron.models.hf import to_hf
    from moetron.precision.convert import FP8Recipe
    from moetron.precision.fp8_gemm import resolve_backend

    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    cfg = load_preset(args.model)
    cfg.num_nextn_predict_layers = 0  # transformers' model has no MTP: the same work on both sides
    torch.manual_seed(0)
    reference = build_model(cfg)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq), generator=gen).to(device)
               for _ in range(args.warmup + args.steps)]

    def ours(fp8=False, compiled=False):
        model = build_model(cfg)
        model.load_state_dict(reference.state_dict())
        model = model.to(device).train()
        if fp8:
            parallelize(model, None, fp8=FP8Recipe(resolve_backend("auto", device)))
        if compiled:
            for block in model.layers:
                block.compile(backend=args.compile_backend)
        return model

    def theirs():  # the same weights, moved across with to_hf
        return to_hf(reference).to(device).train()

    flops = training_flops_per_token(cfg, args.seq)
    peak = gemm_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__ if transformers else None,
           "model": args.model,
           "seq": args.seq, "micro_batch": args.micro_batch, "steps": args.steps,
           "gflop_per_token": flops / 1e9, "gemm_tflops": peak, "runs": {}}
    makers = {"transformers": (theirs, _hf_loss), "eager": (ours, _ours_loss),
              "compiled": (lambda: ours(compiled=True), _ours_loss), "fp8": (lambda: ours(fp8=True), _ours_loss)}
    failed = out["failed"] = {}
    for name in args.candidates:
        make, loss_fn = makers[name]
        try:
            result = train_rate(make(), loss_fn, batches, args.warmup, device, autocast_dtype)
        except RuntimeError as err:  # one candidate's failure (a GEMM this torch refuses) is a result too
            failed[name] = str(err).splitlines()[0][:300]
            print(f"{name}: failed: {failed[name]}", file=sys.stderr)
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["tflops"] = result["tokens_per_s"] * flops / 1e12
        result["mfu_vs_gemm"] = result["tflops"] / peak
        out["runs"][name] = result
    runs = out["runs"]
    if "transformers" in runs:
        out["ratios_vs_transformers"] = {k: v["tokens_per_s"] / runs["transformers"]["tokens_per_s"]
                                         for k, v in runs.items() if k != "transformers"}
    if "eager" in runs and "fp8" in runs:
        out["fp8_vs_eager"] = runs["fp8"]["tokens_per_s"] / runs["eager"]["tokens_per_s"]
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for name, r in runs.items():
            print(f"{name:13s} {r['tokens_per_s']:12,.0f} tok/s {r['tflops']:8.2f} TFLOP/s "
                  f"{r['mfu_vs_gemm']:6.1%} of GEMM peak, memory peak {r['peak_gib']:.2f} GiB")
        print("ratios:", out.get("ratios_vs_transformers"), "fp8/eager:", out.get("fp8_vs_eager"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

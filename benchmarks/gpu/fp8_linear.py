"""FP8 linear forward + backward (quantization included) against BF16, at DeepSeek-V3's shapes.

For each shape (in -> out features) and token count, times one forward and backward of:
- bf16: F.linear in bfloat16 (autograd's three GEMMs);
- fp8: moetron's FP8 linear on `--backend` (1x128 activation tiles, 128x128 weight blocks; the
  quantization of x, W, dy and the transposed operands counted in the time);
and the grouped expert GEMM (E experts, tokens spread evenly): bf16 `torch._grouped_mm` against the
FP8 grouped GEMM (one blockwise scaled GEMM per expert). It first checks the backend against
`emulated` on one small shape (forward and both gradients, within float32 rounding of the same
quantized values), and reports that too. Target (issue 14): fp8 at least 1.4x bf16 on an H200.

    python benchmarks/gpu/fp8_linear.py --backend torch --json          # Hopper
    python benchmarks/gpu/fp8_linear.py --device cpu --tokens 256 --shapes 256x128 --experts 4 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from moetron.precision.fp8_linear import FP8GroupedGemm, fp8_linear

SHAPES = ["7168x2048", "7168x1536", "2048x7168"]  # expert gate/up, q down-projection, expert down


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up (and autotuning)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def _fwd_bwd(linear, x, w, dy):
    def step():
        x.grad = w.grad = None
        linear(x, w).backward(dy)
    return step


def check_backend(backend: str, device) -> dict:
    """The backend against `emulated` on the same inputs (forward, dx, dW)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(256, 512, generator=g).to(device)
    w = (torch.randn(384, 512, generator=g) * 0.05).to(device)
    dy = torch.randn(256, 384, generator=g).to(device)
    results = {}
    for name in ("emulated", backend):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, name)
        y.backward(dy)
        results[name] = (y.detach().float(), xr.grad.float(), wr.grad.float())
    errors = {}
    for i, what in enumerate(("y", "dx", "dw")):
        ref, got = results["emulated"][i], results[backend][i]
        errors[what] = float((got - ref).abs().max() / ref.abs().max())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="torch", choices=["torch", "emulated"])
    parser.add_argument("--shapes", nargs="*", default=SHAPES, help="IN x OUT features")
    parser.add_argument("--tokens", nargs="*", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--experts", type=int, default=32, help="experts of the grouped GEMM (shape 7168x2048)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "backend": args.backend, "check_vs_emulated": check_backend(args.backend, device),
           "linear": [], "grouped": []}
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        for m in args.tokens:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(n, k, device=device, dtype=torch.float32) * 0.02
            w.requires_grad_()
            dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
            bf16 = _time(_fwd_bwd(lambda a, b: F.linear(a, b.to(torch.bfloat16)), x, w, dy), device, args.repeats)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                fp8 = _time(_fwd_bwd(lambda a, b: fp8_linear(a, b, args.backend), x, w, dy), device, args.repeats)
            flops = 3 * 2 * m * k * n
            out["linear"].append({"shape": shape, "tokens": m, "bf16_ms": bf16 * 1e3, "fp8_ms": fp8 * 1e3,
                                  "speedup": bf16 / fp8, "bf16_tflops": flops / bf16 / 1e12,
                                  "fp8_tflops": flops / fp8 / 1e12})
    k, n, e = 7168, 2048, args.experts
    for m in args.tokens:
        counts = torch.full((e,), m // e, dtype=torch.int64, device=device)
        x = torch.randn(m // e * e, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(e, n, k, device=device) * 0.02).requires_grad_()
        dy = torch.randn(x.shape[0], n, device=device, dtype=torch.bfloat16)
        offs = counts.cumsum(0).to(torch.int32)
        grouped = FP8GroupedGemm(args.backend)

        def bf16_grouped(a, b):
            return torch._grouped_mm(a, b.to(torch.bfloat16).transpose(-2, -1), offs=offs)

        bf16 = _time(_fwd_bwd(bf16_grouped, x, w, dy), device, args.repeats) if device.type == "cuda" else float("nan")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            fp8 = _time(_fwd_bwd(lambda a, b: grouped(a, b, counts), x, w, dy), device, args.repeats)
        out["grouped"].append({"experts": e, "shape": f"{k}x{n}", "tokens": x.shape[0], "bf16_ms": bf16 * 1e3,
                               "fp8_ms": fp8 * 1e3, "speedup": bf16 / fp8})
    print(json.dumps(out, indent=1) if args.json else out)


if __name__ == "__main__":
    main()

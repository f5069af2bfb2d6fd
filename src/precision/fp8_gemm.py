"""FP8 GEMMs on quantized operands, y = a b^T, for the three products of a linear layer:

- forward  y  = x  W^T: a = x as 1x128 tiles (along K), b = W as 128x128 blocks;
- dgrad    dx = dy W  : a = dy as 1x128 tiles (along N), b = W^T as blocks (W's, transposed);
- wgrad    dW = dy^T x: a = dy^T and b = x^T, both as 1x128 tiles along the tokens.

Backends:
- `emulated` (the reference, any device): the exact quantized values, multiplied in float32 one
  128-wide chunk of the reduction at a time, each chunk's product scaled and accumulated in float32,
  as the report's promotion of partial sums every 128 elements (section 3.3.2) does;
- `torch`: `torch._scaled_mm` with 1x128 / 128x128 block scales (Hopper, CUDA 12.9+), in the scale
  layouts measured on an H200 (../shared/reference/h200-measurements.md). CPU builds refuse them;
- `te`: transformer-engine's Float8BlockScaling for the linear layers (moetron.precision.te_backend).

Shape legend: M rows of a, N rows of b, Kp the padded reduction, Kt = Kp / 128 chunks.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from moetron.precision.quantize import TILE, Blocks, Tiles

Operand = Union[Tiles, Blocks]
BACKENDS = ("auto", "emulated", "torch", "te")


def _row_scales(b: Operand) -> torch.Tensor:
    return b.row_scales() if isinstance(b, Blocks) else b.scale


def emulated_mm(a: Tiles, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
    """a b^T [M, N] from FP8 operands: float32 products per 128-chunk of the reduction, scaled by the
    two operands' scales of that chunk and accumulated in float32."""
    if a.data.shape[1] != b.data.shape[1]:
        raise ValueError(f"reduction dims differ: {a.data.shape[1]} vs {b.data.shape[1]}")
    M, Kp = a.data.shape
    N = b.data.shape[0]
    a_MTC = a.data.float().view(M, Kp // TILE, TILE)
    b_NTC = b.data.float().view(N, Kp // TILE, TILE)
    b_scale_NT = _row_scales(b)
    out_MN = torch.zeros(M, N, dtype=torch.float32, device=a.data.device)
    for t in range(Kp // TILE):
        partial_MN = a_MTC[:, t] @ b_NTC[:, t].t()
        out_MN.addcmul_(partial_MN, a.scale[:, t, None] * b_scale_NT[None, :, t])
    return out_MN.to(out_dtype)


def torch_scaled_mm(a: Tiles, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
    """a b^T with torch's blockwise scaled GEMM (Hopper): a row-major, b column-major (the
    transpose of row-major data), scales in the layouts below, the reduction zero-padded to a
    multiple of 4 tiles (`pad_reduction`). Not yet run on a GPU by this project:
    benchmarks/gpu/device_check.sh holds it against `emulated`."""
    a, b = pad_reduction(a, b)
    return torch._scaled_mm(a.data, b.data.t(), scale_a=scale_a_layout(a), scale_b=scale_b_layout(b),
                            out_dtype=out_dtype)


def pad_reduction(a: Tiles, b: Operand, tiles: int = 4) -> tuple[Tiles, Operand]:
    """Both operands with the reduction zero-padded to a multiple of `tiles` 128-wide tiles (scales
    of the new tiles 1): the product is exactly the same (the new terms are zeros), and a 128x128
    block scale's rows need no padding of their own, so the layout torch's blockwise check wants
    (unpadded) and the one cuBLASLt reads (rows padded to 4 tiles) are one and the same. Without
    it a reduction of 5 tiles (V3's kv_a_proj_with_mqa input gradient) is refused or read wrong."""
    Kt = a.scale.shape[1]
    extra = -Kt % tiles
    if extra == 0:
        return a, b
    a = Tiles(F.pad(a.data, (0, extra * TILE)), F.pad(a.scale, (0, extra), value=1.0), a.cols)
    b = type(b)(F.pad(b.data, (0, extra * TILE)), F.pad(b.scale, (0, extra), value=1.0), b.cols)
    return a, b


def scale_a_layout(a: Tiles) -> torch.Tensor:
    """scale_a for 1x128 tiles: (M, Kt), outer-dim-major (stride (1, M))."""
    return a.scale.t().contiguous().t()


def scale_b_layout(b: Operand) -> torch.Tensor:
    """scale_b: for 128x128 blocks (Kt, Nb) inner-dim-major with a 16-byte aligned stride (stride
    (1, L4), L4 = Kt rounded up to 4); for 1x128 tiles (the weight gradient) (Kt, N) with stride
    (N, 1). These are the layouts torch's own blockwise tests use."""
    if isinstance(b, Blocks):
        Nb, Kt = b.scale.shape
        padded = b.scale.new_zeros(Nb, -(-Kt // 4) * 4)
        padded[:, :Kt] = b.scale
        return padded[:, :Kt].t()
    return b.scale.t().contiguous()


@torch.overrides.wrap_torch_function(lambda a, b, *rest, **kw: (a.data, b.data))
def fp8_mm(a: Tiles, b: Operand, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """a b^T on `backend` ("emulated" or "torch"; resolved, see `resolve_backend`). A torch function:
    moetron.plan.memory's fake-tensor run replaces it by its output's shape."""
    if backend == "torch":
        return torch_scaled_mm(a, b, out_dtype)
    return emulated_mm(a, b, out_dtype)


def torch_blockwise_available(device: torch.device) -> tuple[bool, str]:
    """(whether torch's blockwise scaled GEMM can run here, what is missing if not)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "a CUDA GPU (torch's CPU build refuses 1x128/128x128 block scales)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return False, f"a Hopper GPU (sm_90); this one is sm_{major}{minor}"
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < (12, 9):
        return False, f"CUDA 12.9 or newer in the torch build (it has {torch.version.cuda})"
    return True, ""


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend to run: `auto` is `torch` on Hopper and `emulated` elsewhere. A backend this
    machine cannot run raises ValueError naming precision.backend and what is missing."""
    if name not in BACKENDS:
        raise ValueError(f"precision.backend={name!r}: choose one of {list(BACKENDS)}")
    if name == "emulated":
        return name
    ok, missing = torch_blockwise_available(device)
    if name == "auto":
        return "torch" if ok else "emulated"
    if name == "torch" and not ok:
        raise ValueError(f"precision.backend=torch needs {missing}; use precision.backend=emulated (any device) "
                         "or auto")
    if name == "te":
        from moetron.precision.te_backend import te_available
        te_ok, te_missing = te_available(device)
        if not (te_ok and ok):
            raise ValueError(f"precision.backend=te needs {te_missing or missing} (TE runs the linears; the grouped "
                             "experts run on torch's blockwise GEMM); use precision.backend=auto or emulated")
    return name

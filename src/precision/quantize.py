"""Fine-grained FP8 quantization (DeepSeek-V3 report, section 3.3.2, figure 7a).

Activations and gradients get one scale per 1x128 tile along the reduction dimension; weights one
per 128x128 block. A tile's scale is its amax / 448 (E4M3's largest finite value), so the tile's
largest element maps onto 448; values are clamped to +-448 before the cast, because CPU and GPU
casts differ at overflow. `pow2=True` rounds every scale up to a power of two (the report does this
for dispatched tokens and cached activations): dequantization is then exact scaling by 2^k. A
dimension that is not a multiple of 128 is zero-padded (the padding never changes a product); an
all-zero tile gets scale 1 and stays zero.

Shape legend: M rows, K the reduction dimension (padded: Kp = 128 x ceil(K / 128)), Kt = Kp / 128
tiles per row, N output rows of a weight, Nb = ceil(N / 128) row blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -t.shape[dim] % multiple
    if extra == 0:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim % t.ndim) + [0, extra]
    return F.pad(t, pad)


def _scales(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """Dequantization scale per tile from its amax (float32): amax / 448, 1 for an all-zero tile."""
    scale = amax.float() / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _cast(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


@dataclass
class Tiles:
    """x quantized per 1x128 tile along its last dimension: data [M, Kp] E4M3, scale [M, Kt] float32;
    `cols` is K before padding."""
    data: torch.Tensor
    scale: torch.Tensor
    cols: int

    def dequantize(self) -> torch.Tensor:
        M, Kp = self.data.shape
        x = self.data.float().view(M, Kp // TILE, TILE) * self.scale.unsqueeze(-1)
        return x.view(M, Kp)[:, :self.cols]


@dataclass
class Blocks:
    """w quantized per 128x128 block: data [N, Kp] E4M3, scale [Nb, Kt] float32; `cols` is K before
    padding. Blocks are square, so `transposed()` is the quantization of w^T, exactly."""
    data: torch.Tensor
    scale: torch.Tensor
    cols: int

    def row_scales(self) -> torch.Tensor:
        """[N, Kt]: each row's scale per 128-column tile (its block's)."""
        return self.scale.repeat_interleave(TILE, dim=0)[:self.data.shape[0]]

    def transposed(self) -> "Blocks":
        N = self.data.shape[0]
        data_T = _pad_to(self.data.t(), 1, TILE)[:self.cols]  # [K, Np]
        return Blocks(data_T.contiguous(), self.scale.t().contiguous(), N)

    def dequantize(self) -> torch.Tensor:
        N, Kp = self.data.shape
        x = self.data.float().view(N, Kp // TILE, TILE) * self.row_scales().unsqueeze(-1)
        return x.view(N, Kp)[:, :self.cols]


def quantize_tiles(x_MK: torch.Tensor, pow2: bool = False) -> Tiles:
    """One scale per 1x128 tile of each row (along K, the GEMM's reduction dimension)."""
    M, K = x_MK.shape
    x = _pad_to(x_MK.float(), 1, TILE).view(M, -1, TILE)  # [M, Kt, 128]
    scale_MT = _scales(x.abs().amax(dim=-1), pow2)
    data = _cast(x / scale_MT.unsqueeze(-1)).reshape(M, -1).contiguous()  # row-major, as scaled GEMMs need
    return Tiles(data, scale_MT, K)


def quantize_blocks(w_NK: torch.Tensor, pow2: bool = False) -> Blocks:
    """One scale per 128x128 block; a stack of weights [E, N, K] at once gives data [E, N, Kp] and
    scale [E, Nb, Kt], `Blocks(data[e], scale[e], K)` being expert e's."""
    *lead, N, K = w_NK.shape
    w = _pad_to(_pad_to(w_NK.float(), -1, TILE), -2, TILE)  # [..., Np, Kp]
    Np, Kp = w.shape[-2:]
    blocks = w.view(*lead, Np // TILE, TILE, Kp // TILE, TILE)
    scale = _scales(blocks.abs().amax(dim=(-3, -1)), pow2)  # [..., Nb, Kt]
    data = _cast(blocks / scale[..., :, None, :, None]).reshape(*lead, Np, Kp)[..., :N, :].contiguous()
    return Blocks(data, scale, K)

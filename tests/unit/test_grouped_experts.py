"""The grouped-GEMM expert path against a plain per-expert loop, uneven and empty groups included."""
import pytest
import torch

from moetron.models.common.experts import HAS_GROUPED_MM, GroupedExperts, grouped_mm, grouped_mm_loop

pytestmark = pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch build has no torch._grouped_mm")

COUNTS = [5, 0, 17, 1, 0, 9]  # uneven, with empty experts


def autograd_loop(x, w, counts):
    """The reference: one matmul per expert, differentiated by autograd."""
    outs = [chunk @ w[e].t() for e, chunk in enumerate(x.split(counts.tolist()))]
    return torch.cat(outs)


def _operands(dtype):
    counts = torch.tensor(COUNTS)
    x = torch.randn(int(counts.sum()), 32, dtype=dtype, requires_grad=True)
    w = torch.randn(len(COUNTS), 48, 32, dtype=dtype, requires_grad=True)
    return x, w, counts


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_grouped_mm_matches_the_loop(dtype, tol):
    x, w, counts = _operands(dtype)
    g = torch.randn(x.shape[0], 48, dtype=dtype)
    y = grouped_mm(x, w, counts)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    y_ref = grouped_mm_loop(x, w, counts)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), g)
    # Same products, possibly different summation order inside the kernel: float32 within 1e-6
    # relative, bf16 within its 8-bit mantissa (2^-8 ~ 4e-3, doubled for accumulation order).
    for ours, ref in ((y.detach(), y_ref.detach()), (dx, dx_ref), (dw, dw_ref)):
        assert float((ours - ref).abs().max() / ref.abs().max()) < tol
    assert torch.all(dw[1] == 0) and torch.all(dw[4] == 0)  # experts without tokens get zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loop_path_runs_the_products_autograd_runs(dtype):
    """moetron's per-expert loop (its own autograd Function, so that it can defer the weight
    gradient) against autograd differentiating the same loop: bitwise, forward and both gradients."""
    x, w, counts = _operands(dtype)
    g = torch.randn(x.shape[0], 48, dtype=dtype)
    y = grouped_mm_loop(x, w, counts)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    y_ref = autograd_loop(x, w, counts)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), g)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)


def test_unaligned_shapes_fall_back_to_the_loop():
    counts = torch.tensor([2, 3])
    x = torch.randn(5, 6)  # 24-byte rows: not 16-byte aligned
    w = torch.randn(2, 10, 6)
    assert torch.equal(grouped_mm(x, w, counts), grouped_mm_loop(x, w, counts))


def test_expert_module_paths_agree():
    experts = GroupedExperts(6, 32, 16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    counts = torch.tensor(COUNTS)
    x = torch.randn(int(counts.sum()), 32)
    with torch.no_grad():
        y_grouped = experts(x, counts)
    experts.use_grouped_mm = False
    with torch.no_grad():
        y_loop = experts(x, counts)
    assert float((y_grouped - y_loop).abs().max() / y_loop.abs().max()) < 1e-6  # float32, as above

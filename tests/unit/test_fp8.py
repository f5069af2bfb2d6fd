"""FP8 with fine-grained scaling: quantizers, the emulated GEMM, the FP8 linear and grouped experts,
backend choice and the converter."""
import pytest
import torch
from torch import nn

from moetron.core.weight_grads import WeightGradStore
from moetron.models.common.linear_cross_entropy import OutputHead
from moetron.precision.convert import FP8Recipe, convert_to_fp8
from moetron.precision.fp8_gemm import emulated_mm, resolve_backend
from moetron.precision.fp8_linear import FP8GroupedGemm, FP8Linear, fp8_linear, forget_weight_blocks
from moetron.precision.quantize import E4M3_MAX, quantize_blocks, quantize_tiles

# E4M3 keeps 3 mantissa bits: rounding moves a value by at most 2^-4 of itself, or 2^-10 (in units of
# the scale) in the subnormal range; a product of two rounded values by at most (1 + 2^-4)^2 - 1
ROUNDING = 2.0 ** -4
PRODUCT = (1 + ROUNDING) ** 2 - 1


def _within_quantization_bound(got, exact, a_abs, b_abs_T, slack=1e-6):
    """|got - exact| <= PRODUCT x (|a| @ |b|^T) elementwise (plus float32 rounding slack)."""
    bound = PRODUCT * (a_abs @ b_abs_T) + slack * (1 + exact.abs())
    return bool(((got - exact).abs() <= bound).all())


def test_tile_scales_are_exact_for_known_inputs_and_zero_tiles_are_safe():
    x = torch.zeros(2, 200)
    x[0, :128] = torch.linspace(-896.0, 0.0, 128)  # amax 896 -> scale 2
    x[0, 128:] = 1.0  # amax 1 -> scale 1/448
    q = quantize_tiles(x)
    assert q.data.shape == (2, 256) and q.scale.shape == (2, 2)  # K=200 padded to two tiles
    assert q.scale[0, 0] == 2.0 and q.scale[0, 1] == pytest.approx(1 / 448, rel=1e-7)
    assert q.scale[1].tolist() == [1.0, 1.0] and q.data[1].float().abs().sum() == 0  # all-zero row
    assert q.data[0, 0].float() == -E4M3_MAX  # the tile's amax lands on 448
    assert torch.equal(q.dequantize()[1], x[1]) and q.dequantize().shape == x.shape


def test_power_of_two_scales_round_up():
    x = torch.full((1, 128), 300.0)  # 300 / 448 -> 2^0
    x[0, 0] = -0.5
    q = quantize_tiles(x, pow2=True)
    assert q.scale.item() == 1.0
    q = quantize_tiles(x * 4, pow2=True)
    assert q.scale.item() == 4.0 and torch.equal(q.dequantize(), quantize_tiles(x, pow2=True).dequantize() * 4)


@pytest.mark.parametrize("pow2", [False, True])
def test_quantization_error_is_within_the_e4m3_bound_per_tile(pow2):
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 300)
    for q in (quantize_tiles(x, pow2), quantize_blocks(x, pow2)):
        scale = (q.scale if q.scale.shape[0] == x.shape[0] else q.row_scales()).repeat_interleave(128, 1)[:, :300]
        err = (q.dequantize() - x).abs()
        assert (err <= torch.maximum(x.abs() * ROUNDING, scale * 2.0 ** -10) * (1 + 1e-6)).all()


def test_blocks_transposed_are_the_blocks_of_the_transpose():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    direct, transposed = quantize_blocks(w.t().contiguous()), quantize_blocks(w).transposed()
    assert torch.equal(direct.scale, transposed.scale)
    assert torch.equal(direct.data.view(torch.uint8), transposed.data.view(torch.uint8))
    assert direct.scale.shape == (2, 3)


def test_emulated_gemm_is_the_exact_product_of_the_quantized_values():
    g = torch.Generator().manual_seed(2)
    a, w = torch.randn(33, 300, generator=g), torch.randn(70, 300, generator=g)
    qa, qw = quantize_tiles(a), quantize_blocks(w)
    exact = qa.dequantize().double() @ qw.dequantize().double().t()
    got = emulated_mm(qa, qw, torch.float32)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)  # float32 sums of exact products
    assert _within_quantization_bound(got.double(), a.double() @ w.double().t(), a.abs().double(),
                                      w.abs().double().t())


def test_emulated_gemm_matches_torch_scaled_mm_with_rowwise_scales():
    """With one tile per row (K = 128), 1x128 tile scales are row-wise scales, which torch's CPU
    build's scaled GEMM takes: the two agree to float32 rounding."""
    g = torch.Generator().manual_seed(3)
    qa, qb = quantize_tiles(torch.randn(32, 128, generator=g)), quantize_tiles(torch.randn(48, 128, generator=g))
    ours = emulated_mm(qa, qb, torch.float32)
    theirs = torch._scaled_mm(qa.data, qb.data.t(), scale_a=qa.scale, scale_b=qb.scale.t(), out_dtype=torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_fp8_linear_forward_and_gradients_are_within_the_quantization_bound():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 100, 300, generator=g, dtype=torch.float32, requires_grad=True)
    w = nn.Parameter(torch.randn(200, 300, generator=g) * 0.05)
    dy = torch.randn(2, 100, 200, generator=g)
    y = fp8_linear(x, w)
    y.backward(dy)
    x64, w64, dy64 = x.detach().double().view(200, 300), w.detach().double(), dy.double().view(200, 200)
    assert _within_quantization_bound(y.detach().double().view(200, 200), x64 @ w64.t(), x64.abs(), w64.abs().t())
    assert _within_quantization_bound(x.grad.double().view(200, 300), dy64 @ w64, dy64.abs(), w64.abs())
    assert _within_quantization_bound(w.grad.double(), dy64.t() @ x64, dy64.abs().t(), x64.abs())
    assert w.grad.dtype == torch.float32


def test_grouped_fp8_equals_one_fp8_linear_per_expert_and_defers_its_weight_gradient():
    g = torch.Generator().manual_seed(5)
    w = nn.Parameter(torch.randn(3, 40, 130, generator=g))
    counts = torch.tensor([5, 0, 9])
    x = torch.randn(14, 130, generator=g, requires_grad=True)
    dy = torch.randn(14, 40, generator=g)
    FP8GroupedGemm("emulated")(x, w, counts).backward(dy)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = [nn.Parameter(w.detach()[e].clone()) for e in range(3)]
    rows, grads = x_ref.split([5, 0, 9]), dy.split([5, 0, 9])
    for e in (0, 2):
        fp8_linear(rows[e], w_ref[e]).backward(grads[e])
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(w.grad[0], w_ref[0].grad) and torch.equal(w.grad[2], w_ref[2].grad)
    assert not w.grad[1].any()  # no rows, no gradient

    store = WeightGradStore()
    store.enabled = True
    w_late = nn.Parameter(w.detach().clone())
    FP8GroupedGemm("emulated")(x.detach(), w_late, counts, store).backward(dy)
    assert w_late.grad is None and len(store._current) == 1
    store.close_batch()
    store.run_oldest()  # the W action
    assert torch.equal(w_late.grad, w.grad)


def test_backends_this_machine_cannot_run_are_refused_naming_the_key():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "emulated" and resolve_backend("emulated", cpu) == "emulated"
    with pytest.raises(ValueError, match="precision.backend=torch needs a CUDA GPU"):
        resolve_backend("torch", cpu)
    with pytest.raises(ValueError, match="precision.backend=te needs transformer-engine"):
        resolve_backend("te", cpu)
    with pytest.raises(ValueError, match="precision.backend='fp4': choose one of"):
        resolve_backend("fp4", cpu)


def test_the_converter_puts_fp8_in_the_decoder_and_leaves_head_router_and_norms():
    from moetron.models import build_model
    from moetron.models.deepseek_v3 import load_preset
    from moetron.models.common.parallelize import parallelize

    model = build_model(load_preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parallelize(model, None, fp8=FP8Recipe("emulated"))
    assert type(model.lm_head) is OutputHead  # the head stays in the compute dtype (report section 3.3.1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(isinstance(m, FP8Linear) for m in linears if m is not model.lm_head)
    assert all(m.expert_gemm is not None for m in model.modules() if hasattr(m, "expert_gemm"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # same weights, same names
    out = model(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16)))
    assert torch.isfinite(out.loss)


def test_convert_counts_what_it_converted():
    block = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    assert convert_to_fp8(block, FP8Recipe("emulated")) == 2 and isinstance(block[2], FP8Linear)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="torch's blockwise scaled GEMM needs a Hopper GPU")
def test_the_torch_backend_matches_emulated_on_hopper():
    """Both multiply the same quantized values with FP32 accumulation: float32 rounding apart."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(256, 512, generator=g).cuda()
    w = (torch.randn(384, 512, generator=g) * 0.05).cuda()
    dy = torch.randn(256, 384, generator=g).cuda()
    grads = {}
    for backend in ("emulated", "torch"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, backend)
        y.backward(dy)
        grads[backend] = (y, xr.grad, wr.grad)
    for ours, theirs in zip(grads["emulated"], grads["torch"], strict=True):
        torch.testing.assert_close(theirs.float(), ours.float(), rtol=1e-3, atol=1e-3)


def test_the_torch_backend_hands_scaled_mm_the_layouts_it_checks():
    """What torch checks before a blockwise scaled GEMM (its meta function, made to take the CUDA
    branch), for the forward, input-gradient and weight-gradient operands, with token counts a
    multiple of 128 and not; and the scale strides torch's own blockwise tests use."""
    meta = pytest.importorskip("torch._meta_registrations")
    if not hasattr(meta, "_check_scaled_mm_sizes"):
        pytest.skip("this torch has no blockwise size check to hold the layouts against")
    from moetron.precision import fp8_gemm

    hint = meta.device_hint
    meta.device_hint = lambda t: "cuda"
    try:
        for M in (256, 200):
            x, w, dy = torch.randn(M, 384), torch.randn(256, 384), torch.randn(M, 256)
            for a, b in ((quantize_tiles(x), quantize_blocks(w)), (quantize_tiles(dy), quantize_blocks(w).transposed()),
                         (quantize_tiles(dy.t()), quantize_tiles(x.t()))):
                scale_a, scale_b = fp8_gemm.scale_a_layout(a), fp8_gemm.scale_b_layout(b)
                meta._check_scaled_mm_sizes(a.data, b.data.t(), scale_a, scale_b, out_dtype=torch.bfloat16)
                assert scale_a.stride(0) == 1  # outer-dim-major
                if isinstance(b, type(quantize_blocks(w))):
                    assert scale_b.stride(0) == 1 and scale_b.stride(1) % 4 == 0  # 16-byte aligned
                else:
                    assert scale_b.is_contiguous()
    finally:
        meta.device_hint = hint


def test_rows_rounded_by_fp8_dispatch_quantize_again_exactly_with_power_of_two_scales():
    """The experts' input tiles are the dispatch's tiles: with power-of-two scales on both sides a
    dispatched row is not rounded twice (with amax / 448 scales it would be)."""
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(7)) * torch.logspace(-4, 2, 300)
    dispatched = quantize_tiles(x, pow2=True).dequantize()
    assert torch.equal(quantize_tiles(dispatched, pow2=True).dequantize(), dispatched)
    assert not torch.equal(quantize_tiles(dispatched).dequantize(), dispatched)


def test_fp8_weight_blocks_are_quantized_once_per_change_of_the_weight():
    """FP8Linear's blocks are shared by the micro-batches of a step and made again after the weight
    changes in place (an optimizer step, ZeRO-1's gather, a checkpoint load)."""
    torch.manual_seed(0)
    linear = FP8Linear.from_linear(torch.nn.Linear(256, 128, bias=False), "emulated")
    x = torch.randn(4, 256)
    first = linear.weight_blocks(linear.weight)
    y1 = linear(x)
    assert linear.weight_blocks(linear.weight) is first
    with torch.no_grad():
        linear.weight.mul_(2.0)
    assert linear.weight_blocks(linear.weight) is not first
    assert torch.equal(linear(x), fp8_linear(x, linear.weight))  # the fresh blocks: no stale weight
    assert not torch.equal(linear(x), y1)


def test_a_step_after_a_fused_optimizer_update_reads_the_new_weights():
    """A fused AdamW changes the weights without a new tensor version: the micro-batch runner forgets
    the FP8 blocks as each step starts, so the second step's loss is the updated model's."""
    import copy

    from moetron.models import build_model, get_spec, load_preset
    from moetron.train.micro_batches import LocalMicroBatches

    torch.manual_seed(0)
    cfg = load_preset("tiny")
    model = build_model(cfg).train()
    get_spec(cfg.arch).parallelize(model, None, "alltoall", False, fp8=FP8Recipe("emulated"))
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    batch = [(ids[:, :-1], ids[:, 1:])]
    micro = LocalMicroBatches(model, torch.device("cpu"), torch.float32)
    micro.run(batch, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    optimizer.step()
    optimizer.zero_grad()
    fresh = copy.deepcopy(model)  # the updated weights, no blocks made from the old ones
    forget_weight_blocks([fresh])
    assert torch.equal(micro.run(batch, {}), LocalMicroBatches(fresh, torch.device("cpu"), torch.float32).run(batch, {}))


@pytest.mark.parametrize("tiles", [1, 4, 5, 7])
def test_the_reduction_is_padded_to_four_tiles_without_changing_the_product(tiles):
    """torch's blockwise check wants the 128x128 scales unpadded, cuBLASLt reads their rows padded to
    4 tiles: with the reduction zero-padded to a multiple of 4 tiles the two layouts coincide, and
    the product is the same to the bit (V3's kv_a_proj_with_mqa input gradient reduces over 5)."""
    from moetron.precision.fp8_gemm import pad_reduction, scale_a_layout, scale_b_layout

    torch.manual_seed(0)
    a, b = quantize_tiles(torch.randn(64, 128 * tiles)), quantize_blocks(torch.randn(256, 128 * tiles))
    pa, pb = pad_reduction(a, b)
    assert pa.scale.shape[1] % 4 == 0 and pb.scale.shape[1] == pa.scale.shape[1]
    assert torch.equal(emulated_mm(pa, pb, torch.float32), emulated_mm(a, b, torch.float32))
    layout = scale_b_layout(pb)
    assert layout.shape == (pb.scale.shape[1], 2) and layout.stride() == (1, pb.scale.shape[1])  # no padding left
    assert scale_a_layout(pa).shape == (64, pa.scale.shape[1])


def test_the_te_recipe_scales_tiles_by_their_amax_as_the_other_backends(monkeypatch):
    """TE's Float8BlockScaling rounds scales up to powers of two by default; the `te` backend sets
    exact amax / 448 scales for inputs, weights and gradients (TE's recipe classes stood in for)."""
    import dataclasses
    import sys
    import types

    from moetron.precision.te_backend import exact_scales_recipe

    @dataclasses.dataclass(frozen=True)
    class QParams:
        power_2_scale: bool = False
        amax_epsilon: float = 0.0

    class Float8BlockScaling:  # TE's defaults: power-of-two scales
        fp8_quant_fwd_inp = fp8_quant_fwd_weight = fp8_quant_bwd_grad = QParams(power_2_scale=True)

    recipe_module = types.ModuleType("transformer_engine.common.recipe")
    recipe_module.Float8BlockScaling, recipe_module.QParams = Float8BlockScaling, QParams
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.common", types.ModuleType("transformer_engine.common"))
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", recipe_module)
    recipe = exact_scales_recipe()
    for q in (recipe.fp8_quant_fwd_inp, recipe.fp8_quant_fwd_weight, recipe.fp8_quant_bwd_grad):
        assert q == QParams(power_2_scale=False, amax_epsilon=0.0)
    assert Float8BlockScaling.fp8_quant_fwd_inp.power_2_scale  # the class's defaults untouched


def test_any_optimizer_step_forgets_the_fp8_weight_blocks():
    """A loop of one's own (a benchmark, a notebook) with a fused AdamW, which changes the weight
    without a new tensor version: the step forgets the blocks before it changes the weights."""
    torch.manual_seed(0)
    linear = FP8Linear.from_linear(torch.nn.Linear(256, 128, bias=False), "emulated")
    x = torch.randn(4, 256)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, fused=True)
    linear(x).square().sum().backward()
    version = linear.weight._version
    optimizer.step()
    assert linear.weight._version == version  # the fused kernel bumps no version
    assert torch.equal(linear(x), fp8_linear(x, linear.weight))

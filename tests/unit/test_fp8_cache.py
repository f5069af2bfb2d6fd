"""FP8 activation caching (report section 3.3.3) and the transformer-engine backend."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moetron.precision.convert import FP8Recipe
from moetron.precision.fp8_linear import FP8GroupedGemm, FP8Linear, fp8_linear
from moetron.precision.fp8_swiglu import fp8_cached_swiglu
from moetron.precision.quantize import quantize_tiles


def _saved_bytes(fn):
    """Bytes autograd keeps for the backward while fn() builds its graph, and fn's result."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes), out


def test_a_cached_fp8_linear_keeps_one_byte_per_input_element_and_the_same_forward_and_input_gradient():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 384, generator=g, requires_grad=True)
    w = nn.Parameter(torch.randn(128, 384, generator=g) * 0.05)
    dy = torch.randn(256, 128, generator=g)
    plain_bytes, y_plain = _saved_bytes(lambda: fp8_linear(x, w))
    cached_bytes, y_cached = _saved_bytes(lambda: fp8_linear(x, w, cache_input=True))
    x_bytes = x.numel() * 4
    assert plain_bytes - cached_bytes == x_bytes - (x.numel() + 256 * 3 * 4)  # x for its tiles and scales
    assert torch.equal(y_plain, y_cached)
    grad_x_plain, grad_w_plain = torch.autograd.grad(y_plain, (x, w), dy)
    grad_x_cached, grad_w_cached = torch.autograd.grad(y_cached, (x, w), dy)
    assert torch.equal(grad_x_plain, grad_x_cached)
    # the weight gradient sees x rounded once more (its cached tiles): one more E4M3 rounding
    exact = dy.double().t() @ x.detach().double()
    bound = ((1 + 2.0 ** -4) ** 3 - 1) * (dy.double().abs().t() @ x.detach().double().abs()) + 1e-6
    assert bool(((grad_w_cached.double() - exact).abs() <= bound).all())
    x_cached = quantize_tiles(x.detach()).dequantize()
    assert torch.equal(grad_w_cached, torch.autograd.grad(fp8_linear(x_cached, w), w, dy)[0])


def test_the_cached_grouped_gemm_equals_the_plain_one_on_its_cached_inputs():
    g = torch.Generator().manual_seed(8)
    w = nn.Parameter(torch.randn(3, 40, 130, generator=g))
    counts = torch.tensor([5, 0, 9])
    x = torch.randn(14, 130, generator=g, requires_grad=True)
    dy = torch.randn(14, 40, generator=g)
    y = FP8GroupedGemm("emulated", cache_input=True)(x, w, counts)
    y.backward(dy)
    x_deq = quantize_tiles(x.detach()).dequantize().requires_grad_()
    w_ref = nn.Parameter(w.detach().clone())
    y_ref = FP8GroupedGemm("emulated")(x_deq, w_ref, counts)
    y_ref.backward(dy)
    assert torch.equal(y, FP8GroupedGemm("emulated")(x, w, counts))
    assert torch.equal(w.grad, w_ref.grad)


def test_fp8_cached_swiglu_has_the_exact_output_and_the_gradients_of_its_cached_inputs():
    g = torch.Generator().manual_seed(9)
    gate = torch.randn(6, 200, generator=g, requires_grad=True)
    up = torch.randn(6, 200, generator=g, requires_grad=True)
    dy = torch.randn(6, 200, generator=g)
    cached_bytes, y = _saved_bytes(lambda: fp8_cached_swiglu(gate, up))
    assert torch.equal(y, F.silu(gate) * up)
    assert cached_bytes == 2 * (6 * 256 + 6 * 2 * 4)  # two inputs as E4M3 tiles (padded) with their scales
    y.backward(dy)
    g_deq = quantize_tiles(gate.detach()).dequantize().requires_grad_()
    u_deq = quantize_tiles(up.detach()).dequantize().requires_grad_()
    (F.silu(g_deq) * u_deq).backward(dy)
    torch.testing.assert_close(gate.grad, g_deq.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(up.grad, u_deq.grad, rtol=1e-5, atol=1e-6)


def test_caching_activations_in_the_model_keeps_attention_output_inputs_and_saves_memory():
    from moetron.models import build_model
    from moetron.models.deepseek_v3 import load_preset
    from moetron.models.common.parallelize import parallelize

    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    saved = {}
    for cache in (False, True):
        torch.manual_seed(0)
        model = build_model(load_preset("tiny"))
        parallelize(model, None, fp8=FP8Recipe("emulated", cache_activations=cache))
        saved[cache], out = _saved_bytes(lambda: model(ids, ids))
        out.loss.backward()
        assert torch.isfinite(out.loss)
    o_projs = [m for n, m in model.named_modules() if n.endswith("o_proj")]
    assert o_projs and all(isinstance(m, FP8Linear) and not m.cache_input for m in o_projs)
    assert all(m.cache_input for n, m in model.named_modules() if isinstance(m, FP8Linear) and not n.endswith("o_proj"))
    assert all(m.activation is fp8_cached_swiglu for m in model.modules() if hasattr(m, "activation"))
    assert saved[True] < 0.9 * saved[False], saved  # 12% less in the tiny model, whose attention core dominates



@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the te backend runs on Hopper GPUs only")
def test_the_te_backend_matches_emulated_on_a_gpu():
    """TE's Float8BlockScaling quantizes as we do (1x128 tiles, 128x128 blocks): the two agree to
    the rounding of their accumulation order."""
    pytest.importorskip("transformer_engine.pytorch")
    from moetron.precision.te_backend import TELinear
    g = torch.Generator().manual_seed(10)
    w = nn.Parameter((torch.randn(384, 512, generator=g) * 0.05).cuda())
    x = torch.randn(256, 512, generator=g).cuda()
    linear = nn.Linear(512, 384, bias=False).cuda()
    linear.weight = w
    te_linear = TELinear(linear)
    assert te_linear.weight is w and [n for n, _ in te_linear.named_parameters()] == ["weight"]
    y_te = te_linear(x)
    y_ref = fp8_linear(x, w, "emulated")
    torch.testing.assert_close(y_te.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def test_a_biased_linear_keeps_its_bias_and_another_activation_is_not_swapped():
    """GPT-OSS under precision=fp8 with cached activations: its attention's biases survive the
    conversion (added after the FP8 GEMM), and its experts' clamped SwiGLU is not replaced by the
    cached plain SwiGLU (a different function)."""
    from moetron.models import build_model, load_preset
    from moetron.precision.convert import convert_to_fp8

    model = build_model(load_preset("gpt_oss_tiny"))
    experts = model.layers[0].mlp.experts
    clamped = experts.activation
    convert_to_fp8(model.layers, FP8Recipe("emulated", cache_activations=True))
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, FP8Linear) and q_proj.bias is not None
    x = torch.randn(2, 5, q_proj.in_features)
    torch.testing.assert_close(q_proj(x) - fp8_linear(x, q_proj.weight, "emulated"), q_proj.bias.expand(2, 5, -1))
    assert experts.activation is clamped and experts.expert_gemm is not None

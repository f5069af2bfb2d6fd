"""Shapes, losses and where gradients flow in the DeepSeek-V3 model."""
import pytest
import torch

from moetron.models import Parallelized, build_model, get_spec, load_preset
from moetron.models.deepseek_v3 import DeepSeekV3, LMOutput
from moetron.models.deepseek_v3.mtp import IGNORE_INDEX, shift_left
from moetron.models.common.experts import GroupedExperts
from moetron.models.common.parallelize import shard_moe_layers
from moetron.models.deepseek_v3.params import count_parameters, training_flops_per_token
from moetron.parallel.dims import ParallelDims, ParallelGroups, Topology


def _batch(cfg, batch=4, seq=32):
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    return ids[:, :-1], ids[:, 1:]


def test_logits_shape_and_inference_ignores_mtp():
    cfg = load_preset("tiny")
    model = build_model(cfg).eval()
    inputs, _ = _batch(cfg, 3, 20)
    logits = model(inputs)
    assert logits.shape == (3, 20, cfg.vocab_size)
    without_mtp = DeepSeekV3(load_preset("tiny", num_nextn_predict_layers=0)).eval()
    without_mtp.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    # The same main-model weights give bitwise the same logits: MTP takes no part in inference.
    assert torch.equal(without_mtp(inputs), logits)


@pytest.mark.parametrize("mode", ["loss_free", "seq_aux", "aux_loss", "none"])
def test_gradients_reach_every_parameter_and_never_the_bias(mode):
    cfg = load_preset("tiny", balance_mode=mode, num_nextn_predict_layers=2)
    model = build_model(cfg).train()
    inputs, labels = _batch(cfg, 8, 32)  # 256 tokens x top-2 over 8 experts: every expert gets tokens
    out = model(inputs, labels)
    assert isinstance(out, LMOutput)
    assert out.loss_mtp is not None
    if mode == "none":
        assert out.loss_balance is None
    else:  # each mode's default alpha is positive
        assert out.loss_balance is not None and out.loss_balance.item() > 0
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
    for name, buf in model.named_buffers():
        assert not buf.requires_grad, name
        if name.endswith("expert_bias"):
            assert buf.grad is None and torch.all(buf == 0), name


def test_loss_is_main_plus_weighted_mtp_plus_balance():
    cfg = load_preset("tiny", num_nextn_predict_layers=2, mtp_loss_weight=0.3)
    model = build_model(cfg).train()
    inputs, labels = _batch(cfg)
    out = model(inputs, labels)
    expected = out.loss_lm + out.loss_mtp + out.loss_balance
    assert torch.equal(out.loss, expected)
    ce = torch.nn.functional.cross_entropy(out.logits_BSV.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss_lm, ce, rtol=0, atol=0)


def test_mtp_targets_are_shifted_by_depth():
    labels = torch.arange(10).view(1, 10)
    # depth k predicts t_{i+k+1} = labels[i+k]; the last k positions have no target.
    assert shift_left(labels, 2, fill=IGNORE_INDEX).tolist() == [[2, 3, 4, 5, 6, 7, 8, 9, -100, -100]]


@pytest.mark.parametrize("preset", ["tiny", "mini", "v3_671b"])
def test_parameter_count_from_the_config_equals_the_modules(preset):
    cfg = load_preset(preset)
    model = build_model(cfg, device="meta")
    count = count_parameters(cfg)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    assert count.total == sum(p.numel() for p in model.parameters()) - mtp and count.mtp == mtp
    routed = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in model.layers.modules()
                 if isinstance(m, GroupedExperts))
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    assert count.activated == count.total - routed * (E - K) // E


def test_training_flops_do_not_depend_on_the_expert_parallel_layout():
    """The FLOPs come from the config: a rank's module under EP holds 1/ep of the routed experts,
    and the figure must not shrink with it (it did when counted from the module)."""
    cfg = load_preset("tiny")
    spec = get_spec(cfg.arch)
    whole = spec.flops_per_token(cfg, 2048)
    model = build_model(cfg, device="meta")
    groups = ParallelGroups(ParallelDims(pp=1, dp=1, ep=4), Topology(1, 4), 1, None, None, None, None, None)
    shard_moe_layers(model, groups, "alltoall", Parallelized())  # the module now holds 2 of 8 experts
    assert model.layers[1].mlp.experts.gate_up_proj.shape[0] == 2
    assert spec.flops_per_token(cfg, 2048) == whole == training_flops_per_token(cfg, 2048)
    assert whole == 5250048.0  # what counting the whole model's modules gave (the old way, right at ep=1)


def test_v3_671b_parameter_count():
    count = count_parameters(load_preset("v3_671b"))
    print(f"v3_671b: {count.total / 1e9:.2f}B total, {count.activated_per_token / 1e9:.2f}B activated per token, "
          f"MTP {count.mtp / 1e9:.2f}B")
    # The report: 671B total, 37B activated per token (the output head counted, the input embedding
    # table not: 36.63B, 37B to whole billions).
    assert abs(count.total - 671e9) / 671e9 < 0.01
    assert round(count.activated_per_token / 1e9) == 37
    assert count.activated_per_token == count.activated - count.embedding_table > 0


def test_rms_norm_gradients():
    from moetron.models.common.norm import RMSNorm

    norm = RMSNorm(16).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    reference = torch.nn.functional.rms_norm(x, (16,), norm.weight, norm.eps)
    torch.testing.assert_close(norm(x), reference, rtol=1e-12, atol=1e-12)  # float64: exact up to rounding


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_fused_rms_norm"), reason="this torch has no fused RMSNorm")
def test_the_fused_rms_norm_kernel_is_bitwise_the_composite():
    """The forward uses torch's fused kernel where it exists: on the CPU its output (float32 and,
    cast back, bfloat16) is bitwise what the composite x * rsqrt(mean(x^2) + eps) gives."""
    from moetron.models.common import norm as layers

    norm = layers.RMSNorm(300)
    torch.nn.init.normal_(norm.weight)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 7, 300) * 3).to(dtype)
        fused = norm(x)
        layers.FUSED_RMS_NORM, was = False, layers.FUSED_RMS_NORM
        try:
            composite = norm(x)
        finally:
            layers.FUSED_RMS_NORM = was
        assert torch.equal(fused, composite)


def test_bf16_autocast_keeps_gating_in_float32():
    cfg = load_preset("tiny")
    model = build_model(cfg).train()
    inputs, labels = _batch(cfg, 2, 16)
    seen = {}
    router = model.layers[1].mlp.gate
    router.register_forward_hook(lambda m, args, out: seen.update(gate=out.topk_weight_TK.dtype))
    experts = model.layers[1].mlp.experts
    experts.register_forward_hook(lambda m, args, out: seen.update(experts=out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs, labels)
    out.loss.backward()
    assert seen == {"gate": torch.float32, "experts": torch.bfloat16}
    assert model.layers[1].mlp.experts.gate_up_proj.grad.dtype == torch.float32  # FP32 master weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_float32_gate_gemm_keeps_its_inputs_and_gives_autograds_gradients(dtype):
    """`float32_linear` (the router's gate): the float32 linear's output and gradients, bitwise,
    with a backward run inside autocast too, while keeping x and the weight as they came (no float32
    copy of a BF16 hidden state saved per token)."""
    from moetron.models.common.router import float32_linear

    torch.manual_seed(0)
    x = torch.randn(50, 32, dtype=dtype, requires_grad=True)
    w, b = torch.randn(8, 32, dtype=dtype, requires_grad=True), torch.randn(8, dtype=dtype, requires_grad=True)
    g = torch.randn(50, 8)
    out = torch.nn.functional.linear(x.float(), w.float(), b.float())
    expected = torch.autograd.grad(out, [x, w, b], g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got_out = float32_linear(x, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(got_out, [x, w, b], g)
    assert torch.equal(got_out, out) and all(torch.equal(a, e) for a, e in zip(got, expected, strict=True))
    assert {t.dtype for t in saved} == {dtype} and {t.data_ptr() for t in saved} == {x.data_ptr(), w.data_ptr(), b.data_ptr()}

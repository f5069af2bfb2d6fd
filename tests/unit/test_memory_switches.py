"""The memory switches (moetron.parallel.memory) change what a model keeps for its backward, not what
it computes: the same loss and gradients within float32 rounding, in every family, with and without
recomputation, and the bytes the measurement says they save."""
import copy

import pytest
import torch

from moetron.models import build_model, get_spec, load_preset
from moetron.plan.memory import MemorySettings, measure

MOE_FAMILIES = ["tiny", "qwen3_moe_tiny", "mixtral_tiny", "deepseek_v2_tiny", "gpt_oss_tiny"]


def _loss_and_grads(model, ids):
    out = model(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    return out.loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("preset", MOE_FAMILIES)
@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
@pytest.mark.parametrize("switch", ["gate_before_down_proj", "chunked_loss"])
def test_each_switch_gives_the_same_loss_and_gradients(preset, recompute, switch):
    torch.manual_seed(0)
    cfg = load_preset(preset)
    spec = get_spec(cfg.arch)
    ref = build_model(cfg).train()
    with torch.no_grad():  # expert biases that matter (GPT-OSS: zeros at init would hide a wrong gate on them)
        for name, p in ref.named_parameters():
            if "experts" in name and name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    gated = copy.deepcopy(ref)
    switches = {s: True for s in spec.recompute_switches(cfg)} if recompute else None
    spec.parallelize(ref, None, "alltoall", False, recompute=switches)
    spec.parallelize(gated, None, "alltoall", False, recompute=switches, memory={switch: True})
    assert [m for m in gated.modules() if getattr(m, switch, False)]
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    (loss_a, grad_a), (loss_b, grad_b) = _loss_and_grads(ref, ids), _loss_and_grads(gated, ids)
    # products reassociated ((a w) W against (a W) w), the head's logits summed in chunks: measured
    # 0-1.5e-7 (loss) and 1.3-2.5e-7 (gradients) relative over the five families; bounds at 7x and 40x
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    assert float((grad_a - grad_b).norm() / grad_a.norm()) < 1e-5


@pytest.mark.parametrize("preset", ["tiny", "qwen3_moe_tiny"])
def test_gates_before_the_down_projection_keep_no_expert_outputs(preset):
    """Under the report's recompute policy, an MoE layer keeps K x H BF16 values per token less: the
    expert outputs that the combine's gate product would keep."""
    cfg = load_preset(preset)
    spec = get_spec(cfg.arch)
    common = dict(recompute=spec.recompute_switches(cfg), fp8=True, fp8_cache=True)
    before = measure(spec, cfg, MemorySettings(128, **common))
    after = measure(spec, cfg, MemorySettings(128, memory=("gate_before_down_proj",), **common))
    K, H = cfg.num_experts_per_tok, cfg.hidden_size
    for b, a in zip(before, after):
        assert b.bytes_per_token - a.bytes_per_token == (2 * K * H if b.kind in ("moe", "mtp") else 0)


@pytest.mark.parametrize("preset", ["tiny", "gpt_oss_tiny"])
def test_the_chunked_loss_keeps_no_logits(preset):
    """The head (and every MTP head) keeps its input, labels and a log-sum-exp per token, no
    float32 log-probabilities over the vocabulary."""
    cfg = load_preset(preset)
    spec = get_spec(cfg.arch)
    for weights in ("float32", "bfloat16"):
        before = measure(spec, cfg, MemorySettings(128, param_dtype=weights))
        after = measure(spec, cfg, MemorySettings(128, memory=("chunked_loss",), param_dtype=weights))
        # float32 weights: the head's input kept as the norm made it (float32) instead of autocast's
        # BF16 copy, 2 H bytes more; BF16 weights: the norm's BF16 output both ways
        extra_input = 2 * cfg.hidden_size if weights == "float32" else 0
        for b, a in zip(before, after):
            if b.kind in ("head", "mtp"):
                # the float32 log-probabilities gone (4 V bytes), a float32 log-sum-exp kept (and a
                # scalar per micro-batch)
                assert b.bytes_per_token - a.bytes_per_token == pytest.approx(4 * cfg.vocab_size - extra_input - 4,
                                                                              abs=0.1)
                if b.kind == "head" and weights == "float32":  # nor the head's BF16 weight copy (MTP heads share it)
                    assert b.shared_copy_bytes - a.shared_copy_bytes == 2 * cfg.vocab_size * cfg.hidden_size
            else:
                assert a == b


def test_fp8_cached_and_recomputed_swiglu_keeps_only_fp8_inputs():
    """recompute.swiglu with precision.fp8_cache_activations (the report's combination): the region
    keeps the SwiGLU inputs as E4M3 tiles, and the down-projection keeps no copy of the SwiGLU
    output (it reads the region's, refilled in the backward)."""
    from moetron.models.common.mlp import MLP
    from moetron.parallel.recompute import SelectiveRecompute
    from moetron.precision.convert import FP8Recipe, convert_to_fp8

    torch.manual_seed(0)
    H, I = 256, 512
    mlp = MLP(H, I)
    convert_to_fp8(mlp, FP8Recipe("emulated", cache_activations=True))
    SelectiveRecompute({"swiglu": True}).convert(mlp)
    x = torch.randn(2, 64, H, requires_grad=True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = mlp(x)
    # per token (128 rows) and I wide, alive after the forward: the gate and up tiles only; the
    # down-projection's input is the region's output, whose storage is freed until the backward
    kept = [t.dtype for t in saved if t.shape == (128, I) and t.untyped_storage().nbytes() > 0]
    assert kept == [torch.float8_e4m3fn] * 2, kept
    assert [t for t in saved if t.shape == (128, I) and t.dtype == torch.bfloat16]
    out.float().square().mean().backward()
    ref = MLP(H, I)
    ref.load_state_dict(mlp.state_dict())
    convert_to_fp8(ref, FP8Recipe("emulated", cache_activations=True))
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = ref(x_ref)
    out_ref.float().square().mean().backward()
    assert torch.equal(out, out_ref)  # the forward is exact
    # the SwiGLU's backward reads the dequantized inputs either way: the same input gradient; the
    # down-projection's weight gradient reads the output recomputed from them instead of the FP8 tiles
    # of the exact output, two E4M3 roundings apart: measured 5.0e-2 relative (3 seeds), bound at 2x
    assert torch.equal(x.grad, x_ref.grad)
    w, w_ref = mlp.down_proj.weight.grad, ref.down_proj.weight.grad
    assert float((w - w_ref).norm() / w_ref.norm()) < 0.1


def test_the_chunked_loss_runs_the_heads_forward_hooks():
    """ZeRO-1's overlapped gather lands a parameter in its module's forward pre-hook: the chunked
    loss must call the head as a module (the main head and each MTP head), or the head would train
    on the last step's weights."""
    cfg = load_preset("tiny")
    model = build_model(cfg).train()
    get_spec(cfg.arch).parallelize(model, None, "alltoall", False, memory={"chunked_loss": True})
    calls = []
    model.lm_head.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    out = model(ids[:, :-1], ids[:, 1:])
    assert out.logits_BSV is None and calls == [2] * (1 + cfg.num_nextn_predict_layers)

"""The activation accounting (moetron.plan.memory): fake tensors keep exactly what real ones do, the
attention core counts FlashAttention's saved set, weight copies are told apart from activations,
and the planner plans from the measurement itself."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from moetron.models import get_spec, load_preset
from moetron.parallel.memory import MEMORY_SWITCHES
from moetron.plan.cli import main as plan_main, measured_costs
from moetron.plan.memory import COLUMNS, MemorySettings, _StandIns, measure

FAMILIES = ["tiny", "qwen3_moe_tiny", "mixtral_tiny", "deepseek_v2_tiny", "gpt_oss_tiny"]


def _settings(spec, cfg, seq, recompute, fp8, cache):
    return MemorySettings(seq, recompute=spec.recompute_switches(cfg) if recompute else (), fp8=fp8, fp8_cache=cache)


@pytest.mark.parametrize("preset", FAMILIES)
def test_fake_tensors_keep_exactly_what_real_tensors_keep(preset):
    cfg = load_preset(preset)
    spec = get_spec(cfg.arch)
    for _, recompute, fp8, cache in (COLUMNS[0], COLUMNS[-1]):
        settings = _settings(spec, cfg, 64, recompute, fp8, cache)
        fake, real = measure(spec, cfg, settings), measure(spec, cfg, settings, fake=False)
        assert fake == real
        assert all(p.bytes_per_token > 0 for p in fake)


def test_the_attention_core_keeps_what_flash_attention_keeps():
    """q, k, v, the output and a float32 log-sum-exp per query and head: no S x S matrix, so a dense
    layer keeps the same bytes per token at any sequence length."""
    q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) for _ in range(3))
    saved = []
    with _StandIns(fake=False), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert [(tuple(t.shape), t.dtype) for t in saved] == [((2, 4, 64, 16), torch.float32)] * 4 + [((2, 4, 64), torch.float32)]
    assert out.transpose(1, 2).is_contiguous()  # the kernel's [B, S, N, D]: o_proj reads a view
    cfg = load_preset("tiny")
    spec = get_spec(cfg.arch)
    short, long = (measure(spec, cfg, MemorySettings(seq)) for seq in (128, 1024))
    assert short[1].kind == "dense" and short[1].bytes_per_token == long[1].bytes_per_token
    # MoE layers also keep a few [experts]-sized tensors per micro-batch (row counts), spread over its tokens
    assert [p.bytes_per_token for p in short] == pytest.approx([p.bytes_per_token for p in long], rel=1e-3)


def test_weight_copies_are_counted_apart_per_micro_batch_or_per_step():
    """With float32 working weights under autocast every weight a layer multiplies is kept as its
    BF16 copy, 2 bytes per parameter: autocast caches the cast of a dense layer's linears for the
    whole region (a pipeline step's micro-batches share it), the grouped GEMM casts the routed
    experts for each micro-batch. With BF16 working weights there is no copy at all (the float32
    gate reads its weight as it is). FP8 weight blocks (1 byte and a float32 scale per 128 x 128)
    are made once per step."""
    cfg = load_preset("tiny")
    spec = get_spec(cfg.arch)
    model = spec.build(cfg, "meta")
    dense_layer, moe_layer = model.layers[0], model.layers[-1]
    linears = sum(m.weight.numel() for m in dense_layer.modules() if isinstance(m, torch.nn.Linear))
    experts = moe_layer.mlp.experts.gate_up_proj.numel() + moe_layer.mlp.experts.down_proj.numel()
    parts = measure(spec, cfg, MemorySettings(128, param_dtype="float32"))
    dense, moe = parts[1], parts[-3]
    assert (dense.kind, dense.weight_copy_bytes, dense.shared_copy_bytes) == ("dense", 0, 2 * linears)
    assert (moe.kind, moe.routed_copy_bytes, moe.shared_routed_copy_bytes) == ("moe", 2 * experts, 0)
    bf16 = measure(spec, cfg, MemorySettings(128))
    assert all(sum(dataclasses.astuple(p)[2:]) == 0 for p in bf16)
    assert bf16[1].bytes_per_token < dense.bytes_per_token and bf16[-3].bytes_per_token < moe.bytes_per_token
    fp8 = measure(spec, cfg, MemorySettings(128, fp8=True))
    assert fp8[-3].routed_copy_bytes == 0 and fp8[-3].shared_routed_copy_bytes >= experts


@pytest.mark.parametrize("preset", ["tiny", "mini", "v3_671b"])
def test_the_planners_activation_bytes_are_the_measurement_in_every_setting(preset):
    cfg = load_preset(preset)
    spec = get_spec(cfg.arch)
    for _, recompute, fp8, cache in COLUMNS:
        costs = measured_costs(spec, cfg, 4096, recompute, fp8, cache)
        parts = measure(spec, cfg, _settings(spec, cfg, 4096, recompute, fp8, cache))
        assert [c.kind for c in costs] == [p.kind for p in parts]
        for cost, part in zip(costs, parts):
            assert cost.act_bytes == pytest.approx(part.bytes_per_token, rel=0.05)
            assert (cost.weight_copy_bytes, cost.routed_copy_bytes) == (part.weight_copy_bytes, part.routed_copy_bytes)


def test_plan_json_reports_activation_bytes_per_token_by_layer_kind(capsys):
    args = ["parallel.pp=16", "parallel.ep=64", "parallel.schedule=dualpipe", "train.micro_batch=1",
            "plan.recompute=true", "precision=fp8", "--json"]
    assert plan_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    by_kind = out["activation_bytes_per_token"]
    assert set(by_kind) == {"embedding", "dense", "moe", "head", "mtp", "total"}
    cfg = load_preset("v3_671b")
    costs = measured_costs(get_spec("deepseek_v3"), cfg, 4096, True, True, True, MEMORY_SWITCHES)  # all on by default
    assert by_kind["total"] == sum(c.act_bytes for c in costs)
    assert by_kind["moe"] == next(c.act_bytes for c in costs if c.kind == "moe")
    assert set(out["memory_parts_gib"]) >= {"activations", "weight_copies", "master_weights"}


def test_the_memory_table_prints_every_kind_and_setting(capsys):
    assert plan_main(["model=tiny", "train.seq_len=256", "--memory"]) == 0
    out = capsys.readouterr().out
    for word in ("embedding", "dense", "moe", "head", "mtp", "whole model", "fp8+cache+recompute", "weight copies"):
        assert word in out

"""Every family of the zoo against its transformers model, weight for weight: logits of a random tiny
transformers model (every layer kind the family has) equal moetron's, an export and import are
bitwise, a Hugging Face folder starts a run (model.init_from), and `from_hf` / `to_hf` pick the
family from the model they are given."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moetron.models import build_model, get_spec, load_preset  # noqa: E402
from moetron.models.hf import from_hf, to_hf  # noqa: E402

# family preset -> variants of its tiny config that change which code runs
VARIANTS = {
    "qwen3_moe_tiny": {
        "dense_first": {},
        "sliding_window": dict(use_sliding_window=True, sliding_window=7),
        "unnormalised_every_other": dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[]),
    },
    "mixtral_tiny": {
        "full": {},
        "sliding_window_wide_heads": dict(sliding_window=9, head_dim=24),
    },
    "deepseek_v2_tiny": {
        "group_limited_no_q_lora": {},
        "greedy_q_lora_yarn": dict(topk_method="greedy", q_lora_rank=24, num_experts_per_tok=3, routed_scaling_factor=1.0,
                                   rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 16,
                                                 "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                 "mscale_all_dim": 0.707}),
    },
    "gpt_oss_tiny": {
        "sliding_full_sliding": {},
        "full_first_plain_rope": dict(layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                                      rope_scaling=None, sliding_window=5, swiglu_limit=0.5),
    },
}
CASES = [(preset, variant) for preset, variants in VARIANTS.items() for variant in variants]


def _hf_model(preset: str, variant: str, seed: int):
    torch.manual_seed(seed)
    cfg = load_preset(preset, **VARIANTS[preset][variant])
    hf_cfg = get_spec(cfg.arch).hf.hf_config(cfg)
    hf_cfg._attn_implementation = "eager"
    hf_model = getattr(transformers, get_spec(cfg.arch).hf.causal_lm)(hf_cfg).eval()
    with torch.no_grad():  # transformers initialises some tensors to constants: make every one matter
        for name, tensor in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor))
            elif name.endswith("bias") or name.endswith("sinks"):
                tensor.normal_(0.0, 0.1)
    return hf_model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("preset,variant", CASES)
def test_from_hf_gives_transformers_logits(preset, variant, seed):
    hf_model = _hf_model(preset, variant, seed)
    model = from_hf(hf_model).eval()
    assert model.cfg.arch == load_preset(preset).arch  # the family comes from the transformers model
    ids = torch.randint(0, hf_model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(seed))
    ours, theirs = _logits(model, ids), _logits(hf_model, ids)
    assert ours.shape == theirs.shape == (3, 40, hf_model.config.vocab_size)
    # float32, same weights and routing; only summation order differs (SDPA vs eager attention,
    # grouped vs looped experts): a few ulps, far inside 1e-5 of the largest logit
    assert _rel_err(ours, theirs) < 1e-5
    assert _rel_err(ours, _logits(_hf_model(preset, variant, seed + 10), ids)) > 1e-3  # other weights: other logits


@pytest.mark.parametrize("preset,variant", CASES)
def test_export_then_import_is_bitwise(preset, variant):
    hf_model = _hf_model(preset, variant, seed=5)
    back = to_hf(from_hf(hf_model))
    original, returned = hf_model.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for key in original:
        assert torch.equal(original[key], returned[key]), key


@pytest.mark.parametrize("preset", list(VARIANTS))
def test_a_trained_model_exports_to_transformers_and_starts_a_run_from_its_folder(preset, tmp_path):
    cfg = load_preset(preset)
    spec = get_spec(cfg.arch)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # weights no initialiser would give
        model(ids, ids.roll(-1, 1)).loss.backward()
        opt.step()
        opt.zero_grad()
    spec.save_hf(model.eval(), tmp_path / "hf")
    hf_model = getattr(transformers, spec.hf.causal_lm).from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    assert _rel_err(_logits(hf_model.eval(), ids), _logits(model, ids)) < 1e-5
    state = spec.load_hf(cfg, tmp_path / "hf")  # what model.init_from loads
    mine = model.state_dict()
    assert state.keys() == mine.keys()
    for key in mine:
        assert torch.equal(state[key], mine[key]), key


@pytest.mark.parametrize("preset", list(VARIANTS))
def test_an_expert_shard_reads_only_its_experts_from_a_transformers_folder(preset, tmp_path):
    """model.init_from on EP rank 1 of 2, from the files transformers writes (per-expert entries,
    Mixtral's original names, GPT-OSS's interleaved stacks): its half of each expert stack equals the
    whole model's, and it reads those rows and the tensors every rank holds, nothing more."""
    from moetron.models.hf import read_hf_folder
    from moetron.parallel.expert_parallel import shard_experts

    variant = next(iter(VARIANTS[preset]))
    _hf_model(preset, variant, seed=9).save_pretrained(tmp_path / "hf")
    cfg = load_preset(preset, **VARIANTS[preset][variant])
    whole = get_spec(cfg.arch).load_hf(cfg, tmp_path / "hf")
    model = build_model(cfg)
    stacks = [m for m in model.modules() if hasattr(m, "first_expert")]
    assert stacks
    for experts in stacks:
        shard_experts(experts, ep_rank=1, ep_size=2)
    read, total = read_hf_folder(model, cfg, tmp_path / "hf")
    mine = model.state_dict()
    for key, tensor in mine.items():
        rows = whole[key].shape[0] // 2
        expected = whole[key][rows:] if tensor.shape != whole[key].shape else whole[key]
        assert torch.equal(tensor, expected), key
    held = sum(t.numel() * t.element_size() for k, t in mine.items() if not get_spec(cfg.arch).hf.ours_only(k))
    assert read == held < total


def test_a_folder_with_tied_embeddings_starts_the_tied_model(tmp_path):
    """transformers writes no lm_head.weight when it is the embedding: the head comes with the table."""
    hf_model = _hf_model("qwen3_moe_tiny", "dense_first", seed=4)
    hf_model.config.tie_word_embeddings = True
    hf_model.tie_weights()
    hf_model.save_pretrained(tmp_path / "hf")
    from safetensors import safe_open

    assert "lm_head.weight" not in safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt").keys()
    cfg = load_preset("qwen3_moe_tiny", tie_word_embeddings=True)
    model = build_model(cfg)
    model.load_state_dict(get_spec(cfg.arch).load_hf(cfg, tmp_path / "hf"))
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    assert _rel_err(_logits(model.eval(), ids), _logits(hf_model, ids)) < 1e-5


@pytest.mark.parametrize("preset", list(VARIANTS))
def test_init_from_a_folder_of_another_shape_names_the_keys(preset, tmp_path):
    cfg = load_preset(preset)
    spec = get_spec(cfg.arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.save_hf(build_model(cfg).eval(), tmp_path / "hf")
    wider = load_preset(preset, hidden_size=2 * cfg.hidden_size)
    with pytest.raises(ValueError, match="differs from the model's in model.hidden_size"):
        spec.load_hf(wider, tmp_path / "hf")


def test_an_unknown_transformers_family_is_named():
    hf_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(ValueError, match="model_type='llama' has no moetron family"):
        from_hf(transformers.LlamaForCausalLM(hf_cfg))


@pytest.mark.parametrize("preset", list(VARIANTS))
def test_a_save_pretrained_folder_starts_a_model_with_transformers_logits(preset, tmp_path):
    """What model.init_from does with a folder transformers wrote: the model it starts equals it."""
    variant = next(iter(VARIANTS[preset]))
    hf_model = _hf_model(preset, variant, seed=7)
    hf_model.save_pretrained(tmp_path / "hf")
    cfg = load_preset(preset, **VARIANTS[preset][variant])
    model = build_model(cfg)
    model.load_state_dict(get_spec(cfg.arch).load_hf(cfg, tmp_path / "hf"))
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(7))
    assert _rel_err(_logits(model.eval(), ids), _logits(hf_model, ids)) < 1e-5


@pytest.mark.parametrize("preset,one_moe_layer", [("qwen3_moe_tiny", dict(mlp_only_layers=[0, 2])),
                                                  ("mixtral_tiny", dict(num_hidden_layers=1))])
def test_router_aux_loss_coef_weighs_the_balance_loss_as_transformers_does(preset, one_moe_layer):
    """With one MoE layer transformers' pooled statistics are that layer's: its coef x aux_loss equals
    moetron's balance loss exactly (per layer, alpha = coef x K / L)."""
    cfg = load_preset(preset, router_aux_loss_coef=0.05, **one_moe_layer)
    hf_model = getattr(transformers, get_spec(cfg.arch).hf.causal_lm)(get_spec(cfg.arch).hf.hf_config(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf_model(ids, output_router_logits=True).aux_loss
    ours = from_hf(hf_model).train()(ids, ids.roll(-1, 1)).loss_balance
    torch.testing.assert_close(ours.detach(), 0.05 * theirs, rtol=1e-5, atol=0)


def test_init_from_takes_a_folder_whose_run_settings_differ():
    """A published Qwen3 folder (router_aux_loss_coef 0.001) may start a run with another balance
    weight, init range or window-layer record: none of them shape a weight."""
    import tempfile

    cfg = load_preset("qwen3_moe_tiny")
    spec = get_spec(cfg.arch)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.save_hf(build_model(cfg).eval(), folder)
        other = load_preset("qwen3_moe_tiny", router_aux_loss_coef=0.01, initializer_range=0.5, max_window_layers=1,
                            balance_mode="global_aux_loss")
        assert spec.load_hf(other, folder).keys() == build_model(cfg).state_dict().keys()

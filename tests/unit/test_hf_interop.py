"""moetron's DeepSeekV3 against transformers' DeepseekV3ForCausalLM, weight for weight."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moetron.models import build_model, load_preset  # noqa: E402
from moetron.models.deepseek_v3.hf import hf_config_from, hf_key  # noqa: E402
from moetron.models.hf import from_hf, to_hf  # noqa: E402

ROUTING_SETTINGS = {
    "group_limited": dict(n_group=4, topk_group=2, num_experts_per_tok=2),
    "all_groups_top4": dict(n_group=1, topk_group=1, num_experts_per_tok=4),
    "unnormalised_gates": dict(n_group=2, topk_group=1, num_experts_per_tok=3, norm_topk_prob=False),
    "uncompressed_q_llama_rope": dict(q_lora_rank=None, rope_interleave=False, n_group=4, topk_group=3),
    "all_moe_two_shared": dict(first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0),
}


def _hf_model(settings: dict, seed: int):
    torch.manual_seed(seed)
    cfg = load_preset("tiny", num_nextn_predict_layers=0, **settings)
    hf_cfg = hf_config_from(cfg)
    hf_cfg._attn_implementation = "eager"
    hf_model = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # a trained router has non-zero biases: make routing depend on them
        for name, buf in hf_model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)
    return hf_model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("setting", list(ROUTING_SETTINGS))
def test_from_hf_gives_the_same_logits(setting, seed):
    hf_model = _hf_model(ROUTING_SETTINGS[setting], seed)
    model = from_hf(hf_model).eval()
    ids = torch.randint(0, hf_model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert ours.shape == theirs.shape == (3, 40, hf_model.config.vocab_size)
    # float32, same weights and routing; only summation order differs (SDPA vs eager attention,
    # grouped vs looped experts): a few ulps, far inside 1e-5 of the largest logit.
    assert _rel_err(ours, theirs) < 1e-5


@pytest.mark.parametrize("setting", ["group_limited", "uncompressed_q_llama_rope"])
def test_round_trip_back_to_hf_is_exact(setting):
    hf_model = _hf_model(ROUTING_SETTINGS[setting], seed=5)
    back = to_hf(from_hf(hf_model))
    original, returned = hf_model.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for key in original:
        assert torch.equal(original[key], returned[key]), key


def test_to_hf_from_a_trained_moetron_model():
    model = build_model(load_preset("tiny", num_nextn_predict_layers=0))
    with torch.no_grad():
        for router in (m.mlp.gate for m in model.layers[model.cfg.first_k_dense_replace:]):
            router.expert_bias.normal_(0.0, 0.05)
    hf_model = to_hf(model)
    hf_model.config._attn_implementation = "eager"
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33))
    with torch.no_grad():
        assert _rel_err(hf_model(ids).logits, model.eval()(ids)) < 1e-5  # as above
    assert torch.equal(hf_model.model.layers[1].mlp.gate.e_score_correction_bias, model.layers[1].mlp.gate.expert_bias)


def test_mtp_is_left_out_with_a_warning():
    model = build_model(load_preset("tiny", num_nextn_predict_layers=1))
    assert hf_key("mtp.0.eh_proj.weight") is None
    with pytest.warns(UserWarning, match="MTP"):
        to_hf(model)


DEEPSEEK_V3_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
                    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # its published config.json


def test_yarn_as_deepseek_v3_publishes_it_gives_transformers_logits():
    """YaRN's frequencies, its cos/sin factor and MLA's mscale^2 softmax scale, at factor 40."""
    torch.manual_seed(5)
    hf_cfg = hf_config_from(load_preset("tiny", num_nextn_predict_layers=0))
    hf_cfg.rope_parameters = dict(DEEPSEEK_V3_YARN)
    hf_cfg._attn_implementation = "eager"
    hf_model = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    ours = from_hf(hf_model).eval()
    assert ours.cfg.rope_scaling["factor"] == 40.0 and ours.cfg.rope_scaling["mscale_all_dim"] == 1.0
    ids = torch.randint(0, hf_cfg.vocab_size, (2, 48))
    with torch.no_grad():
        assert _rel_err(ours(ids), hf_model(ids).logits) < 1e-5
    back = hf_config_from(ours.cfg)
    assert back.rope_parameters["rope_type"] == "yarn" and back.rope_parameters["factor"] == 40.0
    plain = build_model(load_preset("tiny", num_nextn_predict_layers=0)).eval()
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():  # the check can fail: the same weights under plain RoPE give other logits
        assert _rel_err(plain(ids), hf_model(ids).logits) > 1e-3

def test_an_activation_other_than_silu_is_refused():
    from moetron.models.deepseek_v3.hf import config_from_hf

    cfg = hf_config_from(load_preset("tiny"))
    cfg.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf(cfg)


def test_a_bfloat16_model_routes_as_transformers_does_with_float32_biases():
    """Biases near 1.0 in bfloat16 would lose their last bits; both sides keep them float32."""
    hf_model = _hf_model({}, seed=3)
    with torch.no_grad():
        for name, buf in hf_model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(1.0 + 0.001 * torch.randn_like(buf))
    ours = from_hf(hf_model).to(torch.bfloat16)
    back = to_hf(ours)
    for name, buf in back.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert buf.dtype == torch.float32
            torch.testing.assert_close(buf, dict(hf_model.named_buffers())[name], rtol=0, atol=0)

"""Hugging Face folders as other tools write them: DeepSeek's own layout (MTP depths as extra decoder
layers, each repeating the shared embedding and head) starts every tensor of moetron's DeepSeek-V3,
and tensors with no place in the model (a quantized checkpoint's scales, another model's layers)
are refused by name before anything is read."""
import json
import warnings

import pytest
import torch

from moetron.models import build_model, get_spec
from moetron.models.deepseek_v3 import load_preset
from moetron.models.hf import load_hf_folder, to_hf

pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

INDEX = "model.safetensors.index.json"


def _model():
    torch.manual_seed(11)
    cfg = load_preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=2)
    model = build_model(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.normal_()
    return cfg, model


def _deepseek_mtp_entries(model) -> dict:
    """The MTP depths as DeepSeek's checkpoints hold them: layer num_hidden_layers + d, experts one
    entry per expert, the final norm as shared_head.norm, the embedding and head repeated."""
    state, layers = model.state_dict(), model.cfg.num_hidden_layers
    out = {}
    for key, tensor in state.items():
        if not key.startswith("mtp."):
            continue
        depth, _, rest = key.removeprefix("mtp.").partition(".")
        prefix = f"model.layers.{layers + int(depth)}."
        rest = "shared_head.norm.weight" if rest == "norm.weight" else rest.removeprefix("block.")
        rest = rest.replace("gate.expert_bias", "gate.e_score_correction_bias")
        if rest.endswith("experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate[e].contiguous()
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up[e].contiguous()
        elif rest.endswith("experts.down_proj"):
            for e in range(tensor.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = tensor[e].contiguous()
        else:
            out[prefix + rest] = tensor.contiguous()
        if rest == "eh_proj.weight":  # DeepSeek's columns are [emb; h], the paper's (moetron's) [h; emb]
            h, emb = tensor.chunk(2, dim=1)
            out[prefix + rest] = torch.cat([emb, h], dim=1).contiguous()
            out[prefix + "embed_tokens.weight"] = state["embed_tokens.weight"].clone()
            out[prefix + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    return out


def _save_with_extra_file(folder, model, entries: dict, name: str = "model-extra.safetensors") -> None:
    """transformers' files of `model`, plus `entries` in one more file that the index names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_hf(model).save_pretrained(folder, safe_serialization=True, max_shard_size="200KB")
    save_file(entries, str(folder / name))
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"].update({key: name for key in entries})
    (folder / INDEX).write_text(json.dumps(index))


def test_deepseeks_own_layout_starts_the_mtp_depths(tmp_path):
    cfg, model = _model()
    _save_with_extra_file(tmp_path, model, _deepseek_mtp_entries(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MTP tensor is left fresh
        state = load_hf_folder(cfg, tmp_path)
    mine = model.state_dict()
    assert state.keys() == mine.keys() and any(k.startswith("mtp.1.") for k in mine)
    for key in mine:
        assert torch.equal(state[key], mine[key]), key


def test_without_its_mtp_tensors_a_folder_starts_them_fresh_and_says_so(tmp_path):
    cfg, model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_hf(model).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.warns(UserWarning, match="are not in its files, and it has no mtp.safetensors: they keep their fresh initialisation"):
        state = load_hf_folder(cfg, tmp_path)
    assert torch.equal(state["layers.1.mlp.experts.down_proj"], model.state_dict()["layers.1.mlp.experts.down_proj"])
    fresh = get_spec(cfg.arch).build_module(cfg).state_dict()
    assert not torch.equal(state["mtp.0.eh_proj.weight"], model.state_dict()["mtp.0.eh_proj.weight"])
    assert state["mtp.0.eh_proj.weight"].shape == fresh["mtp.0.eh_proj.weight"].shape


def test_a_quantized_checkpoint_is_named(tmp_path):
    cfg, model = _model()
    scales = {"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1, 1)}
    _save_with_extra_file(tmp_path, model, scales)
    with pytest.raises(ValueError, match="quantized checkpoint .*weight_scale_inv.*dequantize"):
        load_hf_folder(cfg, tmp_path)


def test_mtp_layers_the_model_has_no_depths_for_name_the_setting(tmp_path):
    cfg, model = _model()
    _save_with_extra_file(tmp_path, model, _deepseek_mtp_entries(model))
    fewer = load_preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=1)
    with pytest.raises(ValueError, match=r"layers \[3\] beyond model.num_hidden_layers=2.*num_nextn_predict_layers=2"):
        load_hf_folder(fewer, tmp_path)


def test_a_folder_missing_one_experts_entry_names_it(tmp_path):
    cfg, model = _model()
    entries = _deepseek_mtp_entries(model)
    del entries["model.layers.2.mlp.experts.3.up_proj.weight"]
    _save_with_extra_file(tmp_path, model, entries)
    with pytest.raises(ValueError, match="not model.layers.2.mlp.experts.3.up_proj.weight"):
        load_hf_folder(cfg, tmp_path)


def test_a_tensor_with_no_place_in_the_model_is_named(tmp_path):
    cfg, model = _model()
    _save_with_extra_file(tmp_path, model, {"model.layers.0.self_attn.rel_proj.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match=r"1 tensor\(s\) there have no place .*model.layers.0.self_attn.rel_proj"):
        load_hf_folder(cfg, tmp_path)

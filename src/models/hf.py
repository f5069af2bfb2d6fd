"""Exact weight mapping between moetron's DeepSeekV3 and transformers' `DeepseekV3ForCausalLM`.

    from moetron.models.hf import from_hf, to_hf
    model = from_hf(hf_model)          # every tensor copied, logits equal within float32 rounding
    hf_model = to_hf(model)            # and back

moetron names its modules as transformers does (minus the `model.` prefix), so the mapping is a
rename table: the routing bias is `expert_bias` here and `e_score_correction_bias` there.
MTP modules have no counterpart in transformers' DeepseekV3ForCausalLM (its loader ignores layer 61
of DeepSeek's checkpoint): `to_hf` leaves them out and `from_hf` keeps ours freshly initialised;
both warn. YaRN and other scaled RoPE variants are refused rather than silently mis-mapped.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from moetron.models.deepseek_v3 import DeepSeekV3, DeepSeekV3Config
from moetron.models.common.rope import YARN_KEYS

# Config fields with the same name and meaning on both sides.
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "rope_interleave", "max_position_embeddings", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
    "norm_topk_prob", "rms_norm_eps", "initializer_range", "tie_word_embeddings",
)
_RENAMES = ((".gate.expert_bias", ".gate.e_score_correction_bias"),)


def _import_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Hugging Face interop needs transformers: pip install 'moetron[test]' "
                          "or pip install transformers") from err
    return transformers


def hf_key(key: str) -> str | None:
    """The transformers state-dict key of a moetron key (None for MTP tensors)."""
    if key.startswith("mtp."):
        return None
    for ours, theirs in _RENAMES:
        key = key.replace(ours, theirs)
    return key if key.startswith("lm_head.") else "model." + key


def config_from_hf(hf_config, **overrides) -> DeepSeekV3Config:
    """A moetron config equal to a transformers DeepseekV3Config (plus `overrides`)."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise NotImplementedError(f"rope_type={kind!r}: moetron implements plain RoPE and YaRN (DeepSeek-V3's)")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r}: moetron's experts and MLPs are SwiGLU (SiLU); this config uses "
                         "another activation")
    if hf_config.num_key_value_heads != hf_config.num_attention_heads:
        raise ValueError("MLA has one key/value per head: num_key_value_heads must equal num_attention_heads")
    fields = {name: getattr(hf_config, name) for name in _SHARED_FIELDS}
    fields["rope_theta"] = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    if kind == "yarn":  # transformers' names, kept as they are
        fields["rope_scaling"] = {"type": "yarn", **{k: v for k, v in rope.items() if k in YARN_KEYS - {"type", "rope_type"}}}
    fields["num_nextn_predict_layers"] = int(getattr(hf_config, "num_nextn_predict_layers", 0) or 0)
    fields.update(overrides)
    return DeepSeekV3Config(**fields).validate()


def hf_config_from(cfg: DeepSeekV3Config, **overrides):
    """A transformers DeepseekV3Config describing the same main model (MTP excluded)."""
    transformers = _import_transformers()
    fields = {name: getattr(cfg, name) for name in _SHARED_FIELDS}
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        fields["rope_parameters"] = {**{k: v for k, v in cfg.rope_scaling.items() if k != "type"}, "rope_type": "yarn",
                                     "rope_theta": cfg.rope_theta}
    fields["num_key_value_heads"] = cfg.num_attention_heads
    fields["num_nextn_predict_layers"] = cfg.num_nextn_predict_layers  # recorded; the HF model builds none
    fields.update(overrides)
    return transformers.DeepseekV3Config(**fields)


def _copy_mapped(dst: nn.Module, src_tensors: dict[str, torch.Tensor], key_of) -> list[str]:
    """Copy src_tensors[key_of(k)] into each tensor k of dst's state dict; return unmapped dst keys."""
    unmapped, used = [], set()
    dst_state = dst.state_dict()
    for key, tensor in dst_state.items():
        src_key = key_of(key)
        if src_key is None or src_key not in src_tensors:
            unmapped.append(key)
            continue
        src = src_tensors[src_key]
        if src.shape != tensor.shape:
            raise ValueError(f"shape mismatch for {key} <- {src_key}: {tuple(tensor.shape)} vs {tuple(src.shape)}")
        with torch.no_grad():
            tensor.copy_(src)
        used.add(src_key)
    left = sorted(set(src_tensors) - used)
    if left:
        raise ValueError(f"source tensors with no destination: {left[:5]}{' ...' if len(left) > 5 else ''}")
    return unmapped


def from_hf(hf_model: nn.Module, **overrides) -> DeepSeekV3:
    """A moetron DeepSeekV3 carrying exactly the weights and routing biases of `hf_model`."""
    cfg = config_from_hf(hf_model.config, **overrides)
    model = DeepSeekV3(cfg).to(dtype=next(hf_model.parameters()).dtype)
    ours_to_theirs = {k: hf_key(k) for k in model.state_dict()}
    unmapped = _copy_mapped(model, hf_model.state_dict(), ours_to_theirs.get)
    not_mtp = [k for k in unmapped if not k.startswith("mtp.")]
    if not_mtp:
        raise ValueError(f"tensors missing from the Hugging Face model: {not_mtp[:5]}")
    if unmapped:
        warnings.warn("transformers' DeepseekV3ForCausalLM has no MTP modules: moetron's "
                      f"{cfg.num_nextn_predict_layers} MTP depth(s) keep their fresh initialisation")
    return model


def to_hf(model: DeepSeekV3, **config_overrides) -> nn.Module:
    """A transformers DeepseekV3ForCausalLM with exactly `model`'s main-model weights."""
    transformers = _import_transformers()
    hf_cfg = hf_config_from(model.cfg, **config_overrides)
    hf_model = transformers.DeepseekV3ForCausalLM(hf_cfg).to(dtype=next(model.parameters()).dtype).eval()
    for module in hf_model.modules():  # routing biases in float32 there too (TopKRouter._apply says why)
        if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
            module.e_score_correction_bias = module.e_score_correction_bias.float()
    ours = {hf_key(k): v for k, v in model.state_dict().items() if hf_key(k) is not None}
    theirs_to_ours = {k: k for k in hf_model.state_dict()}
    unmapped = _copy_mapped(hf_model, ours, theirs_to_ours.get)
    if unmapped:
        raise ValueError(f"tensors of the Hugging Face model with no moetron source: {unmapped[:5]}")
    if len(model.mtp):
        warnings.warn(f"to_hf leaves out {len(model.mtp)} MTP depth(s): transformers' DeepseekV3ForCausalLM "
                      "has no MTP modules")
    return hf_model


MTP_FILE = "mtp.safetensors"  # MTP weights, beside the Hugging Face files (transformers has no MTP module)


def save_hf_folder(model: DeepSeekV3, out_dir) -> None:
    """`model` as a Hugging Face folder: config and safetensors that transformers'
    DeepseekV3ForCausalLM loads, and the MTP depths' weights in MTP_FILE (moetron names)."""
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MTP left out: saved on its own below
        to_hf(model).save_pretrained(out, safe_serialization=True)
    mtp = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith("mtp.")}
    if mtp:
        save_file(mtp, str(out / MTP_FILE))


def load_hf_folder(cfg: DeepSeekV3Config, folder) -> dict:
    """The whole model's state dict (moetron names) from a Hugging Face DeepseekV3 folder, MTP
    weights from MTP_FILE where it is there; the folder's config must describe `cfg`'s model, up to
    the positions it covers (a context-extension stage starts from a model with fewer: RoPE and YaRN
    settings have no weights)."""
    from pathlib import Path

    from safetensors.torch import load_file

    transformers = _import_transformers()
    folder = Path(folder)
    hf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    theirs = config_from_hf(hf_model.config)
    positional = {"max_position_embeddings"}
    differ = [f for f in (*_SHARED_FIELDS, "rope_theta") if f not in positional and getattr(theirs, f) != getattr(cfg, f)]
    if differ:
        raise ValueError(f"model.init_from={folder}: its config differs from the model's in "
                         f"{', '.join('model.' + f for f in differ)}; set them as the folder's config.json has them")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MTP comes from its own file
        keep = ("num_nextn_predict_layers", "mtp_loss_weight", "max_position_embeddings", "rope_scaling")
        state = from_hf(hf_model, **{f: getattr(cfg, f) for f in keep}).state_dict()
    if (folder / MTP_FILE).is_file():
        state.update(load_file(str(folder / MTP_FILE)))
    elif cfg.num_nextn_predict_layers:
        warnings.warn(f"{folder} has no {MTP_FILE}: the MTP depths start from a fresh initialisation")
    return state

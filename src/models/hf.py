"""Exact weight mapping between moetron's models and transformers', for every family with an adapter.

    from moetron.models.hf import from_hf, to_hf
    model = from_hf(hf_model)          # the moetron model of hf_model's family, every tensor copied
    hf_model = to_hf(model)            # and back: logits equal within float32 rounding

The family is found from `hf_model.config.model_type` (from_hf) or `model.cfg.arch` (to_hf); its spec's
adapter (`spec.hf`, a moetron.models.common.hf_adapter.HFAdapter) says how configs, keys and tensor
layouts map. `save_hf_folder` / `load_hf_folder` are what `moetron-export --hf` and
`model.init_from` use.
"""
from __future__ import annotations

import warnings
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from moetron.models.common.hf_adapter import HFAdapter, import_transformers
from moetron.models.registry import get_spec, registered_specs


def adapter_of_model_type(model_type: str) -> HFAdapter:
    adapters = {spec.hf.model_type: spec.hf for spec in registered_specs() if spec.hf is not None}
    if model_type not in adapters:
        raise ValueError(f"transformers model_type={model_type!r} has no moetron family; families with a "
                         f"Hugging Face adapter: {sorted(adapters)}")
    return adapters[model_type]


def adapter_of(cfg) -> HFAdapter:
    spec = get_spec(cfg.arch)
    if spec.hf is None:
        raise NotImplementedError(f"model.arch={cfg.arch!r} has no Hugging Face adapter")
    return spec.hf


def _load_exactly(dst: nn.Module, state: dict[str, torch.Tensor], may_miss=lambda key: False) -> list[str]:
    """Copy `state` into dst's tensors (keeping their dtypes); every tensor of `state` must have a
    place of the same shape, and every tensor of dst a source unless `may_miss(key)`. Returns the
    keys left as they were."""
    dst_state = dst.state_dict()
    unknown = sorted(set(state) - set(dst_state))
    if unknown:
        raise ValueError(f"source tensors with no destination: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    missing = [k for k in dst_state if k not in state]
    required = [k for k in missing if not may_miss(k)]
    if required:
        raise ValueError(f"tensors with no source: {required[:5]}{' ...' if len(required) > 5 else ''}")
    with torch.no_grad():
        for key, src in state.items():
            if src.shape != dst_state[key].shape:
                raise ValueError(f"shape mismatch for {key}: {tuple(dst_state[key].shape)} vs {tuple(src.shape)}")
            dst_state[key].copy_(src)
    return missing


def from_hf(hf_model: nn.Module, **overrides) -> nn.Module:
    """The moetron model of `hf_model`'s family carrying exactly its weights (and routing biases)."""
    adapter = adapter_of_model_type(hf_model.config.model_type)
    cfg = adapter.config_from_hf(hf_model.config, **overrides)
    model = get_spec(cfg.arch).build_module(cfg).to(dtype=next(hf_model.parameters()).dtype)
    state = adapter.from_hf_state(hf_model.state_dict(), model.state_dict().keys())
    _load_exactly(model, state, adapter.ours_only)
    for note in adapter.import_notes(cfg):
        warnings.warn(note)
    return model


def to_hf(model: nn.Module, **config_overrides) -> nn.Module:
    """The transformers model of `model`'s family with exactly its weights (what transformers has a
    place for; the adapter warns about the rest)."""
    transformers = import_transformers()
    adapter = adapter_of(model.cfg)
    hf_cfg = adapter.hf_config(model.cfg, **config_overrides)
    hf_model = getattr(transformers, adapter.causal_lm)(hf_cfg).to(dtype=next(model.parameters()).dtype).eval()
    adapter.prepare_hf_model(hf_model)
    _load_exactly(hf_model, adapter.to_hf_state(model.state_dict()))
    for note in adapter.export_notes(model):
        warnings.warn(note)
    return hf_model


def save_hf_folder(model: nn.Module, out_dir) -> None:
    """`model` as a Hugging Face folder: config and safetensors that transformers loads, and what it
    has no place for (DeepSeek-V3's MTP depths) in files of the adapter's beside them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what is left out is saved on its own below
        to_hf(model).save_pretrained(Path(out_dir), safe_serialization=True)
    adapter_of(model.cfg).save_extra(model, out_dir)


def load_hf_folder(cfg, folder) -> dict:
    """The whole model's state dict (moetron names) from a Hugging Face folder of `cfg`'s family. The
    folder's config must describe `cfg`'s model, up to the positions it covers (a context-extension
    stage starts from a model with fewer: RoPE and YaRN settings have no weights); settings
    transformers does not hold (balance, MTP) are `cfg`'s."""
    adapter = adapter_of(cfg)
    folder = Path(folder)
    hf_model = getattr(import_transformers(), adapter.causal_lm).from_pretrained(folder, torch_dtype=torch.float32)
    if hf_model.config.model_type != adapter.model_type:
        raise ValueError(f"model.init_from={folder}: a {hf_model.config.model_type} model, not "
                         f"{adapter.model_type} (model.arch={cfg.arch})")
    theirs = adapter.config_from_hf(hf_model.config)
    ours = adapter.config_from_hf(adapter.hf_config(cfg))  # as transformers would read it (defaults filled)
    compared = adapter.compared_fields(get_spec(cfg.arch).run_settings)
    differ = [f for f in compared if getattr(theirs, f) != getattr(ours, f)]
    if differ:
        raise ValueError(f"model.init_from={folder}: its config differs from the model's in "
                         f"{', '.join('model.' + f for f in differ)}; set them as the folder's config.json has them")
    kept = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in compared and f.name != "arch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what transformers lacks comes from the adapter's files
        state = from_hf(hf_model, **kept).state_dict()
    adapter.load_extra(cfg, folder, state)
    return state

"""Exact weight mapping between moetron's models and transformers', for every family with an adapter.

    from moetron.models.hf import from_hf, to_hf
    model = from_hf(hf_model)          # the moetron model of hf_model's family, every tensor copied
    hf_model = to_hf(model)            # and back: logits equal within float32 rounding

The family is found from `hf_model.config.model_type` (from_hf) or `model.cfg.arch` (to_hf); its spec's
adapter (`spec.hf`, a moetron.models.common.hf_adapter.HFAdapter) says how configs, keys and tensor
layouts map. `save_hf_folder` is what `moetron-export --hf` writes and `read_hf_folder`
what `model.init_from` reads (only the tensors a rank holds).
"""
from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from moetron.models.common.hf_adapter import HFAdapter, import_transformers
from moetron.models.common.hf_files import SafetensorsFiles
from moetron.models.registry import get_spec, registered_specs
from moetron.parallel.materialize import expert_rows, held_state_dict


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
    """The whole model's state dict (moetron names) from a Hugging Face folder of `cfg`'s family
    (checked as `read_hf_folder` checks it); tensors the folder has no place for keep their
    initialisation."""
    model = get_spec(cfg.arch).build_module(cfg)
    read_hf_folder(model, cfg, folder)
    return model.state_dict()


def model_from_folder(folder) -> nn.Module:
    """The moetron model of a Hugging Face folder: its family and config from config.json, every
    tensor read (`read_hf_folder`)."""
    hf_config = import_transformers().AutoConfig.from_pretrained(Path(folder))
    cfg = adapter_of_model_type(hf_config.model_type).config_from_hf(hf_config)
    model = get_spec(cfg.arch).build_module(cfg)
    read_hf_folder(model, cfg, folder)
    return model


def read_hf_folder(model: nn.Module, cfg, folder) -> tuple[int, int]:
    """Fill what this rank holds of `model` (its pipeline stages; of an expert stack, its experts'
    rows) from a Hugging Face folder of `cfg`'s family, reading only those tensors' bytes. Returns
    (bytes read, bytes of the folder's files).

    The folder's config must describe `cfg`'s model, up to the positions it covers (a
    context-extension stage starts from a model with fewer: RoPE and YaRN settings have no
    weights); settings transformers does not hold (balance, MTP) are `cfg`'s. Tensors transformers
    has no place for come from the adapter's `extra_file` when the folder has one, else keep their
    initialisation."""
    adapter, folder = _checked_adapter(cfg, folder), Path(folder)
    rows = expert_rows(model)
    whole = model.state_dict()
    with contextlib.ExitStack() as stack:
        files = stack.enter_context(SafetensorsFiles(folder))
        has_extra = adapter.extra_file is not None and (folder / adapter.extra_file).is_file()
        extra = stack.enter_context(SafetensorsFiles(folder, [adapter.extra_file])) if has_extra else None
        _refuse_unknown_tensors(adapter, cfg, files, folder,
                                {k: _experts(k, t, rows, whole=True) for k, t in whole.items()})
        filled, unread = set(), []
        for key, dst in held_state_dict(model).items():
            experts = _experts(key, dst, rows)
            src = adapter.read_ours(key, cfg, files, experts)
            if src is None and extra is not None and key in extra:
                src = extra.read(key, experts)
            if src is None:
                unread.append((key, dst))
                continue
            if src.shape != dst.shape:
                raise ValueError(f"model.init_from={folder}: {key} is {tuple(src.shape)} there and "
                                 f"{tuple(dst.shape)} here")
            with torch.no_grad():
                dst.copy_(src)
            filled.add(dst.untyped_storage().data_ptr())
        unread = [key for key, dst in unread if dst.untyped_storage().data_ptr() not in filled]  # tied: read
        missing = [key for key in unread if not adapter.ours_only(key)]
        if missing:
            raise ValueError(f"model.init_from={folder}: no tensor there for {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        fresh = [key for key in unread if adapter.ours_only(key) and adapter.extra_file is not None]
        if fresh:
            where = f"its files or its {adapter.extra_file}" if extra else f"its files, and it has no {adapter.extra_file}"
            warnings.warn(f"{folder}: {len(fresh)} tensor(s) transformers has no place for (e.g. {fresh[0]}) are not "
                          f"in {where}: they keep their fresh initialisation")
        return (files.bytes_read + (extra.bytes_read if extra else 0),
                files.file_bytes() + (extra.file_bytes() if extra else 0))


def _experts(key: str, tensor: torch.Tensor, rows: dict, whole: bool = False) -> Optional[range]:
    """The global expert indices of `tensor`'s rows, for an expert stack (all of them with `whole`);
    None for any other tensor."""
    if key not in rows:
        return None
    first, total = rows[key]
    return range(0, total) if whole else range(first, first + tensor.shape[0])


def _checked_adapter(cfg, folder) -> HFAdapter:
    """`cfg`'s adapter, once the folder's config is found to describe `cfg`'s model."""
    adapter = adapter_of(cfg)
    hf_config = import_transformers().AutoConfig.from_pretrained(Path(folder))
    if hf_config.model_type != adapter.model_type:
        raise ValueError(f"model.init_from={folder}: a {hf_config.model_type} model, not "
                         f"{adapter.model_type} (model.arch={cfg.arch})")
    theirs = adapter.config_from_hf(hf_config)
    ours = adapter.config_from_hf(adapter.hf_config(cfg))  # as transformers would read it (defaults filled)
    compared = adapter.compared_fields(get_spec(cfg.arch).run_settings)
    differ = [f for f in compared if getattr(theirs, f) != getattr(ours, f)]
    if differ:
        raise ValueError(f"model.init_from={folder}: its config differs from the model's in "
                         f"{', '.join('model.' + f for f in differ)}; set them as the folder's config.json has them")
    return adapter


QUANTIZED_SUFFIXES = ("weight_scale_inv", "_blocks", "_scales")  # FP8 block scales (DeepSeek-V3), MXFP4 (GPT-OSS)


def _refuse_unknown_tensors(adapter: HFAdapter, cfg, files, folder, experts_of: dict) -> None:
    """A folder tensor that no tensor of the model maps to (a quantized checkpoint, another
    family's layout) is refused, naming it, before anything is read."""
    known = {name for key, experts in experts_of.items() for name in adapter.file_keys(key, cfg, experts)}
    unknown = sorted(set(files.keys()) - known)
    if not unknown:
        return
    if any(name.endswith(QUANTIZED_SUFFIXES) for name in unknown):
        raise ValueError(f"model.init_from={folder}: a quantized checkpoint ({unknown[0]}); moetron starts from "
                         "BF16 or float32 weights: dequantize it first (for DeepSeek-V3's FP8 release, "
                         "DeepSeek's inference/fp8_cast_bf16.py)")
    beyond = sorted({int(m.group(1)) for name in unknown if (m := re.match(r"model\.layers\.(\d+)\.", name))
                     and int(m.group(1)) >= cfg.num_hidden_layers})
    if beyond:
        raise ValueError(f"model.init_from={folder}: it holds layers {beyond} beyond model.num_hidden_layers="
                         f"{cfg.num_hidden_layers}; DeepSeek's checkpoints keep their MTP depths there: set "
                         f"model.num_nextn_predict_layers={max(beyond) + 1 - cfg.num_hidden_layers} if they are (or the model's own layer count)")
    raise ValueError(f"model.init_from={folder}: {len(unknown)} tensor(s) there have no place in "
                     f"moetron's {adapter.model_type} model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")

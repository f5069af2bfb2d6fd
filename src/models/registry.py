"""Architectures by name: the spec of `cfg.arch` builds, parallelizes and describes a model.

    build_model(cfg)               # the model cfg.arch names
    get_spec("deepseek_v3")        # its ModelSpec (moetron.models.spec)
    register_model(MySpec())       # a new architecture
"""
from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn

from moetron.models.spec import ModelSpec

_SPECS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Make `spec.arch` buildable by name (a later registration of the same name replaces it)."""
    if not spec.arch:
        raise ValueError(f"{type(spec).__name__} has no arch name")
    _SPECS[spec.arch] = spec
    return spec


def registered_specs() -> list[ModelSpec]:
    return list(_SPECS.values())


def get_spec(arch: str) -> ModelSpec:
    if arch not in _SPECS:
        raise ValueError(f"model.arch={arch!r} is unknown; registered: {sorted(_SPECS)}. An architecture of "
                         "your own registers itself when its module is imported: imports=[your.module]")
    return _SPECS[arch]


def arch_of(cfg) -> str:
    return cfg["arch"] if isinstance(cfg, (dict, DictConfig)) else cfg.arch


def build_model(cfg, device: Optional[torch.device | str] = None) -> nn.Module:
    """Build the model `cfg.arch` describes. `cfg` is its config dataclass or a Hydra/OmegaConf node
    of it; `device="meta"` builds without allocating (for counting or later materialisation)."""
    spec = get_spec(arch_of(cfg))
    return spec.build(spec.config(cfg), device)


def load_preset(name: str, **overrides):
    """`conf/model/<name>.yaml` as its architecture's validated config (`arch` in the file names it);
    unknown keys raise an error naming them."""
    from importlib import resources

    from omegaconf import OmegaConf

    folder = resources.files("moetron.conf").joinpath("model")
    preset_file = folder.joinpath(f"{name}.yaml")
    if not preset_file.is_file():
        available = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
        raise ValueError(f"no model preset {name!r}; available: {available}")
    preset = OmegaConf.create(preset_file.read_text())
    preset.pop("defaults", None)  # Hydra's defaults list (the schema this merge applies itself)
    spec = get_spec(preset.get("arch", "deepseek_v3"))
    merged = OmegaConf.merge(OmegaConf.structured(spec.config_cls), preset, OmegaConf.create(overrides))
    return spec.config(OmegaConf.to_object(merged))


def _register_builtin() -> None:
    from moetron.models.deepseek_v2.spec import DeepSeekV2Spec
    from moetron.models.deepseek_v3.spec import DeepSeekV3Spec
    from moetron.models.gpt_oss.spec import GptOssSpec
    from moetron.models.mixtral.spec import MixtralSpec
    from moetron.models.qwen3_moe.spec import Qwen3MoeSpec

    for spec in (DeepSeekV3Spec(), Qwen3MoeSpec(), MixtralSpec(), DeepSeekV2Spec(), GptOssSpec()):
        register_model(spec)


_register_builtin()

"""Architectures by name: `build_model(cfg)` dispatches on `cfg.arch`."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

_BUILDERS: dict[str, tuple[type, Callable[..., nn.Module]]] = {}


def register_model(arch: str, config_cls: type, builder: Callable[..., nn.Module]) -> None:
    _BUILDERS[arch] = (config_cls, builder)


def build_model(cfg, device: torch.device | str | None = None) -> nn.Module:
    """Build the model `cfg.arch` describes. `cfg` is its config dataclass or a Hydra/OmegaConf node
    of it; `device="meta"` builds without allocating (for counting or later materialisation)."""
    arch = cfg.arch if not isinstance(cfg, dict) else cfg["arch"]
    if arch not in _BUILDERS:
        raise ValueError(f"model.arch={arch!r} is unknown; registered: {sorted(_BUILDERS)}")
    config_cls, builder = _BUILDERS[arch]
    if isinstance(cfg, (DictConfig, dict)):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_cls), cfg))
    with torch.device(device) if device is not None else nullcontext():
        return builder(cfg)


def _register_builtin() -> None:
    from moetron.models.deepseek_v3 import DeepSeekV3, DeepSeekV3Config

    register_model("deepseek_v3", DeepSeekV3Config, DeepSeekV3)


_register_builtin()

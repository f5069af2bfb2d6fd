"""The model zoo. `build_model(cfg)` builds the architecture named by `cfg.arch`; `get_spec(arch)`
gives its ModelSpec (what the trainer asks of an architecture).

    from moetron.models import build_model, load_preset
    model = build_model(load_preset("tiny"))
"""
from __future__ import annotations

from moetron.models.registry import build_model, get_spec, load_preset, register_model
from moetron.models.spec import ModelSpec, Parallelized
from moetron.models.deepseek_v3 import DeepSeekV3Config

__all__ = ["build_model", "get_spec", "register_model", "ModelSpec", "Parallelized", "DeepSeekV3Config", "load_preset"]

"""The model zoo. `build_model(cfg)` builds the architecture named by `cfg.arch`; `get_spec(arch)`
gives its ModelSpec (what the trainer asks of an architecture).

    from moetron.models import build_model, load_preset
    model = build_model(load_preset("tiny"))
"""
from __future__ import annotations

from moetron.models.registry import build_model, get_spec, load_preset, register_model
from moetron.models.spec import ModelSpec, Parallelized
from moetron.models.deepseek_v3 import DeepSeekV3Config

__all__ = ["build_model", "get_spec", "register_model", "ModelSpec", "Parallelized", "DeepSeekV3Config", "load_preset",
           "from_hf_folder"]


def from_hf_folder(folder):
    """The moetron model a Hugging Face folder holds (its family from config.json's model_type), its
    weights read (moetron.models.hf.model_from_folder)."""
    from moetron.models.hf import model_from_folder

    return model_from_folder(folder)

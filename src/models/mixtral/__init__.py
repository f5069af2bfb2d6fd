"""Mixtral (arXiv 2401.04088): GQA, eight SwiGLU experts per layer, two per token."""
from moetron.models.mixtral.config import MixtralConfig
from moetron.models.mixtral.model import Mixtral

__all__ = ["Mixtral", "MixtralConfig"]

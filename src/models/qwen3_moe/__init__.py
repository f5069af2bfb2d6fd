"""Qwen3-MoE (arXiv 2505.09388): GQA with q/k norm, softmax-routed fine-grained experts, no shared expert."""
from moetron.models.qwen3_moe.config import Qwen3MoeConfig
from moetron.models.qwen3_moe.model import Qwen3Moe

__all__ = ["Qwen3Moe", "Qwen3MoeConfig"]

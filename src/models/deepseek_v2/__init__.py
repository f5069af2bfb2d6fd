"""DeepSeek-V2 (arXiv 2405.04434): MLA and DeepSeekMoE behind a softmax router with device-limited routing."""
from moetron.models.deepseek_v2.config import DeepSeekV2Config
from moetron.models.deepseek_v2.model import DeepSeekV2

__all__ = ["DeepSeekV2", "DeepSeekV2Config"]

"""GPT-OSS (OpenAI, 2025): GQA with sinks and alternating sliding windows, biased clamped-SwiGLU experts."""
from moetron.models.gpt_oss.config import GptOssConfig
from moetron.models.gpt_oss.model import GptOss

__all__ = ["GptOss", "GptOssConfig"]

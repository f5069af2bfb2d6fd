"""DeepSeek-V3 (arXiv 2412.19437): MLA, DeepSeekMoE with loss-free balancing, Multi-Token Prediction."""
from moetron.models.deepseek_v3.config import DeepSeekV3Config, load_preset
from moetron.models.deepseek_v3.model import DeepSeekV3
from moetron.models.common.moe_step import MoEStepStats, finish_moe_step
from moetron.models.outputs import LMOutput

__all__ = ["DeepSeekV3", "DeepSeekV3Config", "LMOutput", "MoEStepStats", "finish_moe_step", "load_preset"]

"""Reinforcement learning on moetron's models: GRPO (DeepSeek-R1; DeepSeekMath section 4.1)."""

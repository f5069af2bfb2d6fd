"""moetron: a Megatron-style trainer for DeepSeek-V3-style models.

Install torch first (pinned; on a CPU machine `pip install torch==2.13.0`), then `pip install -e .`.
The package `moetron` is mapped from `src/`, and its Hydra configs (`moetron.conf`) from `conf/`.
"""
from setuptools import find_packages, setup

# every package under src/ (a folder with an __init__.py) ships: none is listed by hand
SUBPACKAGES = find_packages("src")

setup(
    name="moetron",
    version="0.1.0",
    description="DeepSeek-V3 training system on PyTorch: MLA, DeepSeekMoE, EP, DualPipe, FP8, ZeRO-1",
    python_requires=">=3.10",
    package_dir={"moetron": "src", "moetron.conf": "conf"},
    packages=["moetron", "moetron.conf"] + [f"moetron.{name}" for name in SUBPACKAGES],
    package_data={
        "moetron.conf": ["*.yaml", "*/*.yaml"],  # config groups are folders of yaml
        "moetron.data.corpus": ["*.jsonl", "*.txt"],
        "moetron.data.chat_sample": ["*.jsonl", "*.jinja"],
    },
    install_requires=[
        # torch is not pinned here: install the build for your machine first (see README).
        "torch>=2.6",
        "hydra-core>=1.3",
        "hydra-submitit-launcher>=1.2",  # moetron-train -m hydra/launcher=submitit_slurm: sweeps as SLURM jobs
        "wandb>=0.17",
        "omegaconf>=2.3",
        "numpy",
        "tqdm",
        "matplotlib>=3.7",  # moetron-report, timelines and the planner's chart (headless Agg)
        "tokenizers>=0.15",  # Hugging Face tokenizers for data.tokenizer (local files only)
    ],
    entry_points={
        "console_scripts": [
            "moetron-train=moetron.train.cli:main",
            "moetron-data=moetron.data.cli:main",
            "moetron-export=moetron.train.export_cli:main",
            "moetron-generate=moetron.train.generate_cli:main",
            "moetron-plan=moetron.plan.cli:main",
            "moetron-report=moetron.report.cli:main",
        ],
    },
    extras_require={
        "test": ["pytest>=8", "transformers>=4.57", "safetensors"],
        # CUDA machines only; NVIDIA apex is built from source (see README), the PyPI "apex" is unrelated.
        "gpu": ["transformer-engine[pytorch]", "nvidia-nccl-cu12"],
    },
)

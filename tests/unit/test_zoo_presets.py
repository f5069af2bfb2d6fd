"""Every published-size preset holds its published config.json (tests/published_configs/), and its
parameter count, read off moetron's modules on the meta device, equals transformers' own model of
that config on the meta device, exactly, and rounds to the published total and activated figures."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moetron.models import get_spec, load_preset  # noqa: E402

PUBLISHED = Path(__file__).resolve().parents[1] / "published_configs"
# preset -> (config.json, published total, its last digit's unit, activated, its unit, whether the
# activated figure counts the input embedding table: Qwen's do, DeepSeek's do not)
PRESETS = {
    "qwen3_30b_a3b": ("Qwen--Qwen3-30B-A3B.json", 30.5e9, 0.1e9, 3.3e9, 0.1e9, True),
    "qwen3_235b_a22b": ("Qwen--Qwen3-235B-A22B.json", 235e9, 1e9, 22e9, 1e9, True),
    "deepseek_v2_lite": ("deepseek-ai--DeepSeek-V2-Lite.json", 15.7e9, 0.1e9, 2.4e9, 0.1e9, False),
    "deepseek_v2": ("deepseek-ai--DeepSeek-V2.json", 236e9, 1e9, 21e9, 1e9, False),
    "gpt_oss_20b": ("openai--gpt-oss-20b.json", 21e9, 1e9, 3.6e9, 0.1e9, False),
    "gpt_oss_120b": ("openai--gpt-oss-120b.json", 117e9, 1e9, 5.1e9, 0.1e9, False),
    "moonlight_16b_a3b": ("moonshotai--Moonlight-16B-A3B-Instruct.json", 16e9, 1e9, 3e9, 1e9, False),
    "kimi_k2": ("moonshotai--Kimi-K2-Instruct.json", 1.0e12, 0.1e12, 32e9, 1e9, False),
    "mixtral_8x7b": ("mistralai--Mixtral-8x7B-v0.1.json", 46.7e9, 0.1e9, 12.9e9, 0.1e9, True),
}


def _published_config(file: str):
    fields = json.loads((PUBLISHED / file).read_text())
    model_type = fields.pop("model_type")
    # Kimi K2 names its own model type (remote code) for DeepSeek-V3's architecture
    return transformers.AutoConfig.for_model("deepseek_v3" if model_type == "kimi_k2" else model_type, **fields)


def _rounds_to(count: float, figure: float, unit: float) -> bool:
    """`figure` is `count` rounded, or cut, to `unit`."""
    return figure - unit / 2 <= count < figure + unit


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_preset_holds_the_published_config(preset):
    cfg = load_preset(preset)
    adapter = get_spec(cfg.arch).hf
    published = adapter.config_from_hf(_published_config(PRESETS[preset][0]))
    ours = adapter.config_from_hf(adapter.hf_config(cfg))  # as transformers reads it (defaults filled)
    for field in (*adapter.shared_fields, "rope_theta", "rope_scaling"):
        assert getattr(ours, field) == getattr(published, field), field


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_counts_equal_transformers_and_the_published_figures(preset):
    file, total_figure, total_unit, active_figure, active_unit, embedding_counted = PRESETS[preset]
    cfg = load_preset(preset)
    spec = get_spec(cfg.arch)
    with torch.device("meta"):
        hf_model = getattr(transformers, spec.hf.causal_lm)(_published_config(file))
    theirs = sum(p.numel() for p in hf_model.parameters())
    total, active = spec.parameter_counts(cfg)
    assert total == theirs
    assert _rounds_to(total, total_figure, total_unit), total
    if embedding_counted:
        active += cfg.vocab_size * cfg.hidden_size
    assert _rounds_to(active, active_figure, active_unit), active

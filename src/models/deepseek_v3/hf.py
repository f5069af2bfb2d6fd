"""DeepSeek-V3 against transformers' `DeepseekV3ForCausalLM` (moetron.models.hf does the copying).

moetron names its modules as transformers does (minus the `model.` prefix): the routing bias is
`expert_bias` here and `e_score_correction_bias` there. MTP modules have no counterpart in
transformers' DeepseekV3ForCausalLM (its loader ignores layer 61 of DeepSeek's checkpoint): an
export leaves them out of the model and writes them to MTP_FILE beside it; an import from a
transformers model keeps ours freshly initialised (both warn). A folder holding them as DeepSeek's
checkpoints do (layer num_hidden_layers + d) starts ours from them (`model.init_from`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from moetron.models.common.hf_adapter import SameNamesHF
from moetron.models.deepseek_v3.config import DeepSeekV3Config

MTP_FILE = "mtp.safetensors"  # MTP weights, beside the Hugging Face files (moetron names)


class DeepSeekV3HF(SameNamesHF):
    model_type = "deepseek_v3"
    causal_lm = "DeepseekV3ForCausalLM"
    config_cls, hf_config_cls = DeepSeekV3Config, "DeepseekV3Config"
    shared_fields = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "rope_interleave", "max_position_embeddings", "n_routed_experts",
        "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
        "norm_topk_prob", "rms_norm_eps", "initializer_range", "tie_word_embeddings",
    )
    renames = ((".gate.expert_bias", ".gate.e_score_correction_bias"),)
    extra_file = MTP_FILE

    def config_from_hf(self, hf_config, **overrides) -> DeepSeekV3Config:
        if hf_config.num_key_value_heads != hf_config.num_attention_heads:
            raise ValueError("MLA has one key/value per head: num_key_value_heads must equal num_attention_heads")
        depths = int(getattr(hf_config, "num_nextn_predict_layers", 0) or 0)
        return super().config_from_hf(hf_config, **{"num_nextn_predict_layers": depths, **overrides})

    def hf_config(self, cfg: DeepSeekV3Config, **overrides):
        # MTP depths recorded (transformers' model builds none)
        return super().hf_config(cfg, **{"num_key_value_heads": cfg.num_attention_heads,
                                         "num_nextn_predict_layers": cfg.num_nextn_predict_layers, **overrides})

    def ours_only(self, key: str) -> bool:
        return key.startswith("mtp.")

    def file_key(self, key: str, cfg: DeepSeekV3Config):
        """DeepSeek's own checkpoints hold MTP depth d as decoder layer num_hidden_layers + d, its
        final norm as `shared_head.norm`, `eh_proj` for [emb; h] (transformers' loader skips those
        layers)."""
        if not key.startswith("mtp."):
            return super().file_key(key, cfg)
        depth, _, rest = key.removeprefix("mtp.").partition(".")
        rest = "shared_head.norm.weight" if rest == "norm.weight" else rest.removeprefix("block.")
        return super().file_key(f"layers.{cfg.num_hidden_layers + int(depth)}.{rest}", cfg)

    def from_hf_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if re.fullmatch(r"mtp\.\d+\.eh_proj\.weight", key):  # DeepSeek's [emb; h] columns -> the paper's [h; emb]
            emb, h = tensor.chunk(2, dim=1)
            return torch.cat([h, emb], dim=1)
        return tensor

    def file_keys(self, key: str, cfg: DeepSeekV3Config, experts) -> list[str]:
        # each MTP layer of DeepSeek's checkpoints repeats the embedding and output head it shares
        copies = {"embed_tokens.weight": "embed_tokens.weight", "lm_head.weight": "shared_head.head.weight"}
        layers = range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
        shared = [f"model.layers.{n}.{copies[key]}" for n in layers] if key in copies else []
        return [*super().file_keys(key, cfg, experts), *shared]

    def prepare_hf_model(self, hf_model) -> None:
        for module in hf_model.modules():  # routing biases in float32 there too (TopKRouter._apply says why)
            if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
                module.e_score_correction_bias = module.e_score_correction_bias.float()

    def import_notes(self, cfg: DeepSeekV3Config) -> list[str]:
        return ["transformers' DeepseekV3ForCausalLM has no MTP modules: moetron's "
                f"{cfg.num_nextn_predict_layers} MTP depth(s) keep their fresh initialisation"
                ] if cfg.num_nextn_predict_layers else []

    def export_notes(self, model) -> list[str]:
        return [f"to_hf leaves out {len(model.mtp)} MTP depth(s): transformers' DeepseekV3ForCausalLM "
                "has no MTP modules"] if len(model.mtp) else []

    def save_extra(self, model, out_dir) -> None:
        from safetensors.torch import save_file

        mtp = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith("mtp.")}
        if mtp:
            save_file(mtp, str(Path(out_dir) / MTP_FILE))


ADAPTER = DeepSeekV3HF()


def hf_key(key: str):
    """The transformers state-dict key of a moetron key (None for MTP tensors)."""
    return ADAPTER.hf_key(key)


def config_from_hf(hf_config, **overrides) -> DeepSeekV3Config:
    """A moetron config equal to a transformers DeepseekV3Config (plus `overrides`)."""
    return ADAPTER.config_from_hf(hf_config, **overrides)


def hf_config_from(cfg: DeepSeekV3Config, **overrides):
    """A transformers DeepseekV3Config describing the same main model (MTP excluded)."""
    return ADAPTER.hf_config(cfg, **overrides)

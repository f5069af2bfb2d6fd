"""How one family maps to its transformers model: config fields, state-dict keys and tensor layouts.

A family's spec holds an `HFAdapter` (`spec.hf`); `moetron.models.hf` does the rest for every family
(`from_hf`, `to_hf`, Hugging Face folders for `moetron-export` and `model.init_from`). moetron names
its modules as transformers does without the `model.` prefix, so most adapters are a list of shared
config fields and a few renames; a family whose tensors are laid out otherwise (per-expert weights,
transposed stacks) overrides `to_hf_state` / `from_hf_tensor`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from moetron.models.common.rope import YARN_KEYS


def import_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Hugging Face interop needs transformers: pip install 'moetron[test]' "
                          "or pip install transformers") from err
    return transformers


def rope_from_hf(hf_config) -> tuple[float, Optional[dict]]:
    """(rope_theta, moetron's rope_scaling: None for plain RoPE, a YaRN mapping) of a transformers
    config; other scaled RoPE variants are refused rather than silently mis-mapped."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise NotImplementedError(f"rope_type={kind!r}: moetron implements plain RoPE and YaRN")
    theta = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    unknown = sorted(set(rope) - YARN_KEYS - {"rope_theta"})
    if unknown:
        raise NotImplementedError(f"rope_parameters {unknown}: moetron's RoPE and YaRN take {sorted(YARN_KEYS)}")
    if kind != "yarn":
        return theta, None
    return theta, {"type": "yarn", **{k: v for k, v in rope.items() if k in YARN_KEYS - {"type", "rope_type"}}}


def rope_to_hf(rope_theta: float, rope_scaling: Optional[dict]) -> dict:
    """transformers' `rope_parameters` of moetron's rope settings."""
    if not rope_scaling:
        return {"rope_type": "default", "rope_theta": rope_theta}
    return {**{k: v for k, v in rope_scaling.items() if k != "type"}, "rope_type": "yarn", "rope_theta": rope_theta}


def refuse_other_activation(hf_config, field: str = "hidden_act") -> None:
    act = getattr(hf_config, field, "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{field}={act!r}: moetron's experts and MLPs are SwiGLU (SiLU); this config uses "
                         "another activation")


class HFAdapter:
    """One family's mapping; subclasses set the class attributes and the two config methods."""

    model_type: str = ""  # transformers' `config.model_type`
    causal_lm: str = ""  # transformers' model class, e.g. "Qwen3MoeForCausalLM"
    shared_fields: tuple[str, ...] = ()  # config fields of the same name and meaning on both sides
    renames: tuple[tuple[str, str], ...] = ()  # (ours, theirs) parts of state-dict keys
    # config fields that shape no weight: a folder made for fewer positions may start a longer run
    positional: frozenset = frozenset({"max_position_embeddings", "rope_scaling"})
    # config fields that change neither the weights nor what the model computes from them
    weightless: frozenset = frozenset({"initializer_range"})

    # -- configs -----------------------------------------------------------------------------------
    def config_from_hf(self, hf_config, **overrides) -> Any:
        """moetron's config equal to a transformers config (plus `overrides`), validated."""
        raise NotImplementedError

    def hf_config(self, cfg, **overrides) -> Any:
        """A transformers config of the same model."""
        raise NotImplementedError

    def compared_fields(self, run_settings: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Fields a Hugging Face folder's config must share with the model it starts (not the
        positional or weightless ones, nor the spec's `run_settings`: a balance weight, say)."""
        free = self.positional | self.weightless | set(run_settings)
        return tuple(f for f in (*self.shared_fields, "rope_theta") if f not in free)

    # -- state dicts -------------------------------------------------------------------------------
    def hf_key(self, key: str) -> Optional[str]:
        """transformers' key of a moetron key; None for tensors transformers has no place for."""
        if self.ours_only(key):
            return None
        for ours, theirs in self.renames:
            key = key.replace(ours, theirs)
        return key if key.startswith("lm_head.") else "model." + key

    def ours_only(self, key: str) -> bool:
        """A moetron tensor with no transformers counterpart (kept as initialised on import)."""
        return False

    def to_hf_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.hf_key(k): v for k, v in state.items() if self.hf_key(k) is not None}

    def from_hf_state(self, hf_state: dict[str, torch.Tensor], our_keys) -> dict[str, torch.Tensor]:
        """moetron's tensors from transformers' (keys of ours it has no tensor for are left out)."""
        theirs_to_ours = {self.hf_key(k): k for k in our_keys if self.hf_key(k) is not None}
        unknown = sorted(set(hf_state) - set(theirs_to_ours))
        if unknown:
            raise ValueError(f"Hugging Face tensors with no moetron counterpart: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}")
        return {ours: self.from_hf_tensor(ours, hf_state[theirs])
                for theirs, ours in theirs_to_ours.items() if theirs in hf_state}

    def from_hf_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """moetron's layout of transformers' tensor for our `key` (whole, or some experts' rows of a stack)."""
        return tensor

    # -- Hugging Face files ------------------------------------------------------------------------
    # transformers' files may name and lay tensors out otherwise than its models hold them: routed
    # experts one entry per expert (`experts.7.up_proj.weight`), which its loader stacks into
    # `experts.gate_up_proj` [E, 2I, H] (each expert's gate rows, then its up rows) and
    # `experts.down_proj` [E, H, I]
    disk_renames: tuple[tuple[str, str], ...] = ()  # (in memory, in files) parts of transformers' keys
    expert_entries: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert entry names
    extra_file: Optional[str] = None  # what `save_extra` writes beside the Hugging Face files (moetron names)

    def disk_key(self, theirs: str) -> str:
        for memory, disk in self.disk_renames:
            theirs = theirs.replace(memory, disk)
        return theirs

    def file_key(self, key: str, cfg) -> Optional[str]:
        """The files' name of our `key` as transformers' model holds it (None: not in its files)."""
        return self.hf_key(key)

    def per_expert_keys(self, theirs: str, experts: range) -> Optional[list[list[str]]]:
        """For an expert stack (transformers' in-memory key), the file entries of each expert in
        `experts` (gate and up, or down); None for any other tensor."""
        stem, _, leaf = theirs.rpartition(".experts.")
        gate, up, down = self.expert_entries
        entries = {"gate_up_proj": (gate, up), "down_proj": (down,)}.get(leaf)
        if not stem or entries is None:
            return None
        base = self.disk_key(f"{stem}.experts.")
        return [[f"{base}{e}.{entry}.weight" for entry in entries] for e in experts]

    def file_keys(self, key: str, cfg, experts: Optional[range]) -> list[str]:
        """Every file entry that may hold our `key` (its stacked name or its experts' entries)."""
        theirs = self.file_key(key, cfg)
        if theirs is None:
            return []
        per_expert = self.per_expert_keys(theirs, experts) if experts is not None else None
        return [theirs, self.disk_key(theirs), *(k for keys in per_expert or [] for k in keys)]

    def read_ours(self, key: str, cfg, files, experts: Optional[range] = None) -> Optional[torch.Tensor]:
        """Our tensor `key` of model `cfg` from a folder's `files`
        (moetron.models.common.hf_files.SafetensorsFiles), only the rows of `experts` for an expert
        stack; None where the files do not have it."""
        theirs = self.file_key(key, cfg)
        if theirs is None:
            return None
        for name in (theirs, self.disk_key(theirs)):
            if name in files:
                return self.from_hf_tensor(key, files.read(name, experts))
        per_expert = self.per_expert_keys(theirs, experts) if experts is not None else None
        present = [k in files for keys in per_expert or [] for k in keys]
        if not any(present):
            return None
        if not all(present):
            absent = next(k for keys in per_expert for k in keys if k not in files)
            raise ValueError(f"the folder has some experts' entries of {theirs} and not {absent}")
        stacked = torch.stack([torch.cat([files.read(k) for k in keys]) for keys in per_expert])
        return self.from_hf_tensor(key, stacked)

    # -- hooks -------------------------------------------------------------------------------------
    def prepare_hf_model(self, hf_model) -> None:
        """Adjust a freshly built transformers model before moetron's weights are copied in."""

    def import_notes(self, cfg) -> list[str]:
        """Warnings for a model imported from transformers (what starts fresh)."""
        return []

    def export_notes(self, model) -> list[str]:
        """Warnings for a model exported to transformers (what is left out)."""
        return []

    def save_extra(self, model, out_dir) -> None:
        """Tensors transformers has no place for, written beside the Hugging Face files (`extra_file`)."""


def routing_bias_notes(model) -> list[str]:
    """A warning when loss-free routing biases (which the transformers model has no place for) are set."""
    biased = [name for name, buf in model.named_buffers() if name.endswith("expert_bias") and bool(buf.any())]
    return [f"to_hf leaves out the loss-free routing biases of {len(biased)} layer(s): transformers' "
            f"{model.cfg.arch} routes without them, so its choices of experts differ"] if biased else []


class SameNamesHF(HFAdapter):
    """A family whose config fields have transformers' names (RoPE apart), SwiGLU experts, and routers
    without a routing bias there: moetron's (balance_mode=loss_free) is left out, with a warning."""

    config_cls: type = object  # moetron's config class
    hf_config_cls: str = ""  # transformers' config class, e.g. "Qwen3MoeConfig"

    def config_from_hf(self, hf_config, **overrides):
        refuse_other_activation(hf_config)
        fields = {name: getattr(hf_config, name, None) for name in self.shared_fields}
        fields["rope_theta"], fields["rope_scaling"] = rope_from_hf(hf_config)
        fields.update(overrides)
        return self.config_cls(**fields).validate()

    def hf_config(self, cfg, **overrides):
        fields = {name: getattr(cfg, name) for name in self.shared_fields}
        fields["rope_parameters"] = rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
        fields.update(overrides)
        return getattr(import_transformers(), self.hf_config_cls)(**fields)

    def ours_only(self, key: str) -> bool:
        return key.endswith(".gate.expert_bias")

    def export_notes(self, model) -> list[str]:
        return routing_bias_notes(model)

"""Defaults live in one place: the schemas of moetron.train.config. A group's file (conf/<group>/*.yaml)
sets only what differs from them (and its `name`), so a default changed in the schema is changed
everywhere; the composed config still carries every key."""
import dataclasses
from importlib import resources

import pytest
import yaml

from moetron.train.config import (ClusterConfig, DataConfig, LoggingConfig, OptimConfig, ParallelConfig,
                                  PrecisionConfig, RootConfig)

GROUPS = {"parallel": ParallelConfig, "precision": PrecisionConfig, "optim": OptimConfig, "data": DataConfig,
          "logging": LoggingConfig, "cluster": ClusterConfig}
DOCUMENTS = {"cluster/template.yaml"}  # lists every key on purpose, for users to copy


def _repeated(values: dict, defaults: dict, prefix: str) -> list[str]:
    out = []
    for key, value in (values or {}).items():
        if key == "name" or key not in defaults:
            continue
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            out += _repeated(value, defaults[key], f"{prefix}{key}.")
        elif value == defaults[key]:
            out.append(f"{prefix}{key}")
    return out


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_files_set_only_what_differs_from_the_schema(group):
    defaults = dataclasses.asdict(GROUPS[group]())
    folder = resources.files("moetron.conf").joinpath(group)
    files = [f for f in folder.iterdir() if f.name.endswith(".yaml") and f"{group}/{f.name}" not in DOCUMENTS]
    assert files
    for f in files:
        assert _repeated(yaml.safe_load(f.read_text()), defaults, f"{group}.") == [], f.name


def test_the_root_config_repeats_no_default():
    root = yaml.safe_load(resources.files("moetron.conf").joinpath("config.yaml").read_text())
    defaults = dataclasses.asdict(RootConfig())
    assert _repeated({k: v for k, v in root.items() if k in defaults}, defaults, "") == []

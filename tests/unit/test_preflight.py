"""The command line, looked at once before any rank starts (moetron.train.preflight): every key the
README names can be set on the command line; a misspelled key names the closest real one; a schema is
not a preset; a held run directory is refused naming its holder."""
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moetron.checkpoint.run_lock import RunDirInUse, RunLock, holder_of
from moetron.core.errors import UserInputError
from moetron.train.config import register_configs
from moetron.train.preflight import compose_config, preflight, split_argv

REPO = Path(__file__).resolve().parents[2]
register_configs()

# README words that look like keys but are files
NOT_KEYS = {"model.safetensors", "train.sbatch", "train.sh", "train.max_step"}  # (the last: a misspelling shown)
# a value to set on the command line for each documented key whose default is null
SAMPLES = {
    "model.rope_scaling": "{type:yarn,factor:4,original_max_position_embeddings:64}",
    "model.init_from": "/nonexistent/hf_folder",
    "data.blend": "[[0.3,builtin],[0.7,builtin]]",
    "data.valid_path": "builtin",
    "optim.schedule": "[[0,warmup,1e-3,100],[1000,constant,1e-3]]",
    "parallel.dp": "2",
    "parallel.layout": "[[0,1],[2]]",
    "parallel.zero1": "true",
    "parallel.ordered_issue": "true",
    "parallel.overlap_grad_reduce": "true",
    "parallel.overlap_param_gather": "true",
    "train.batch_ramp": "[4,4,1000]",
    "train.epochs": "2",
    "train.mtp_weight_schedule": "[[0,0.3],[1000,0.1]]",
    "train.bias_update_schedule": "[[0,0.001],[1000,0.0]]",
    "train.deterministic": "true",
    "cluster.nodes": "2",
    "cluster.gpus_per_node": "8",
}


def readme_keys() -> list[str]:
    """Every dotted setting the README names in backticks (brace lists expanded)."""
    keys = set()
    for code in re.findall(r"`([^`]*)`", (REPO / "README.md").read_text()):
        for found in re.findall(r"\b((?:train|model|parallel|optim|data|logging|precision|cluster|recompute)"
                                r"\.[A-Za-z0-9_.{},]+)", code):
            found = found.rstrip(".,")
            braces = re.match(r"^(.*)\.\{([^}]*)\}$", found)
            keys |= {f"{braces.group(1)}.{k}" for k in braces.group(2).split(",")} if braces else {found}
    return sorted(keys - NOT_KEYS)


def _cli_value(value) -> str:
    """`value` as one writes it on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value).replace(" ", "")
    return str(value)


def test_the_readme_names_keys():
    keys = readme_keys()
    assert len(keys) > 40 and "model.rope_scaling" in keys and "parallel.zero1" in keys


def test_every_key_the_readme_names_can_be_set_on_the_command_line():
    """Each set to its default (a sample where that is null: OmegaConf refused a dict for a null
    Optional[Dict]), all on one command line."""
    defaults = compose_config([])
    overrides = {}
    for key in readme_keys():
        default = OmegaConf.select(defaults, key, throw_on_missing=True)
        if OmegaConf.is_config(default):
            default = OmegaConf.to_container(default)
        if default is None:
            assert key in SAMPLES, f"{key} defaults to null: give SAMPLES a value to set it to"
        overrides[key] = SAMPLES[key] if default is None else _cli_value(default)
    cfg = compose_config([f"{key}={text}" for key, text in overrides.items()])
    for key, text in overrides.items():
        set_to = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(set_to):
            set_to = OmegaConf.to_container(set_to)
        assert set_to == yaml_value(text) and set_to is not None, key


def yaml_value(text: str):
    """What Hydra makes of `text` on the command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    value = OverridesParser.create().parse_override(f"k={text}").value()
    return OmegaConf.to_container(OmegaConf.create({"v": value}))["v"]


@pytest.mark.parametrize("override, says", [
    ("train.max_step=3", "train.max_step is not a setting: did you mean train.max_steps?"),
    ("trian.max_steps=3", "trian.max_steps is not a setting: did you mean train.max_steps?"),
    ("model.hiden_size=8", "model.hiden_size is not a setting: did you mean model.hidden_size?"),
    ("model=tin", "model=tin: no such preset; did you mean model=tiny?"),
    ("model.recompute_norm=true", "model.recompute_norm is now recompute.norm"),
    ("train.max_steps=abc", "train.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("+train.foo=1", "train.foo: Key 'foo' not in 'TrainSettings'"),
])
def test_a_bad_command_line_is_one_message_naming_the_fix(override, says):
    with pytest.raises(UserInputError) as err:
        preflight([override], world_size=1, full=False)
    assert says in str(err.value)
    assert "+" + override.split("=")[0] not in str(err.value)  # not Hydra's advice to append the key


def test_schemas_are_not_presets():
    with pytest.raises(UserInputError) as err:
        preflight(["model=deepseek_v3_schema"], world_size=1, full=False)
    assert "no such preset" in str(err.value) and "schema" not in str(err.value).split("choose one of")[1]
    assert "deepseek_v3" in compose_config([]).model.arch


def test_check_runs_every_start_check_against_the_world_size(tmp_path):
    ok = preflight(["parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipev", "train.micro_batch=2",
                    f"hydra.run.dir={tmp_path}"], world_size=4, full=True)
    assert ok.startswith("config ok for 4 ranks: pp=2 x dp=1 x ep=2")
    with pytest.raises(UserInputError, match=r"world size 2 != parallel.pp\*parallel.dp\*parallel.ep = 2\*1\*2"):
        preflight(["parallel.pp=2", "parallel.ep=2", "parallel.dp=1"], world_size=2, full=True)
    assert split_argv(["--check", "--world-size", "4", "model=tiny"]) == (True, 4, ["model=tiny"])
    assert split_argv(["--check", "--world-size=2", "a=b"]) == (True, 2, ["a=b"])
    with pytest.raises(UserInputError, match="--world-size goes with --check"):
        split_argv(["--world-size=2", "a=b"])
    with pytest.raises(UserInputError, match="--world-size takes a number"):
        split_argv(["--world-size", "x"])


def test_a_held_run_directory_is_refused_naming_its_holder(tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RunDirInUse, match=rf"in use by a run that is still alive: pid {os.getpid()} on"):
            RunLock(tmp_path).acquire()
        with pytest.raises(UserInputError, match="choose another hydra.run.dir"):
            preflight([f"hydra.run.dir={tmp_path}"], world_size=1, full=False)
    finally:
        lock.release()
    assert holder_of(tmp_path) is None
    RunLock(tmp_path).acquire().release()


def test_the_lock_dies_with_its_holder(tmp_path):
    """A holder killed with -9 leaves no stale lock."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: take the lock, say so, wait to be killed
        os.close(read)
        RunLock(tmp_path).acquire()
        os.write(write, b"1")
        time.sleep(60)
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    assert f"pid {pid} on" in holder_of(tmp_path)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert holder_of(tmp_path) is None


@pytest.mark.parametrize("stage", ["long_context_32k", "long_context_128k", "sft"])
def test_later_stages_carry_on_with_the_values_pretraining_ended_with(stage):
    """A stage starts a new run (tokens from 0): its MTP weight and bias-update speed are those of the
    end of pre-training (0.1 and 0), not the schedules' starting 0.3 and 0.001."""
    from moetron.train.validate import model_config

    cfg = compose_config(["model=tiny", f"stage={stage}"])
    spec, model_cfg = model_config(cfg)
    assert spec.loss_options(model_cfg, cfg.train, 0)["mtp_weight"] == pytest.approx(0.1)
    assert [list(p) for p in spec.bias_update_schedule(model_cfg, cfg.train)] == [[0, 0.0]]
    fresh = compose_config(["model=tiny"])
    assert spec.loss_options(model_cfg, fresh.train, 0)["mtp_weight"] == pytest.approx(0.3)

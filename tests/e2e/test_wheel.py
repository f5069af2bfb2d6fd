"""moetron as a user installs it: a wheel built from the repository, installed (not editable) into
a fresh virtual environment, run from a folder that is not the repository. Every console script the
wheel declares answers `--help`, and `moetron-train` trains 3 steps on the shipped corpus.

The fresh environment takes moetron's dependencies (torch, hydra, ...) from the test's own
environment through a .pth file: it sees their packages, but not the editable install of moetron
(a .pth file inside a folder that a .pth adds is not run), so `import moetron` finds the wheel's
copy or nothing."""
import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's bin folder, the wheel's console scripts, a folder outside the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # built from a copy: nothing is written into the repository, no stale build/
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "outputs",
                                                                "multirun", "wandb", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp / "dist"), str(source)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp / "dist").glob("moetron-*.whl")
    env_dir = tmp / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    fresh_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    (Path(fresh_site) / "moetron_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True)
    with zipfile.ZipFile(wheel) as zf:
        entry_points = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        parser = configparser.ConfigParser()
        parser.read_string(zf.read(entry_points).decode())
    scripts = sorted(parser["console_scripts"])
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return env_dir / "bin", scripts, elsewhere


def _run(args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_moetron_and_its_configs(installed):
    bin_dir, scripts, elsewhere = installed
    done = _run([str(bin_dir / "python"), "-c", "import moetron, moetron.conf; print(moetron.__file__)"], elsewhere)
    assert done.returncode == 0, done.stderr
    where = Path(done.stdout.strip())
    assert bin_dir.parent in where.parents, f"moetron imported from {where}, not from the fresh environment"
    assert set(scripts) >= {"moetron-train", "moetron-data", "moetron-export", "moetron-plan", "moetron-report"}


def test_every_console_script_answers_help(installed):
    bin_dir, scripts, elsewhere = installed
    for script in scripts:
        done = _run([str(bin_dir / script), "--help"], elsewhere)
        assert done.returncode == 0, f"{script} --help failed:\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stdout + done.stderr, f"{script} --help:\n{done.stdout}\n{done.stderr}"
        assert done.stdout.strip(), f"{script} --help printed nothing"


def test_the_installed_trainer_trains_from_another_folder(installed):
    bin_dir, _, elsewhere = installed
    done = _run([str(bin_dir / "moetron-train"), "train.max_steps=3", "logging.progress=false",
                 "hydra.run.dir=run"], elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [json.loads(line)["step"] for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (elsewhere / "run" / "checkpoints" / "step_00000003").is_dir()
    assert not (REPO / "run").exists()

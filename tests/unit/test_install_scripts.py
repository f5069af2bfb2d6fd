"""What the quick start installs and leaves behind: the torch wheel index launch/env.sh chooses by
the machine (tried with a stand-in nvidia-smi), and the folders the README's commands create are
ignored by git."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _index(tmp_path, nvidia_smi_output=None, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi_output is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/usr/bin/env bash\necho '{nvidia_smi_output}'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    environ = {k: v for k, v in os.environ.items() if k != "MOETRON_TORCH_INDEX"}
    done = subprocess.run(["bash", str(REPO / "launch" / "torch_index.sh")], capture_output=True, text=True,
                          env={**environ, "PATH": path, **env}, check=True)
    return done.stdout.strip()


def test_no_gpu_takes_pytorchs_cpu_index(tmp_path):
    assert shutil.which("nvidia-smi", path=str(tmp_path / "bin") + ":/usr/bin:/bin") is None
    assert _index(tmp_path) == CPU_INDEX
    assert _index(tmp_path, nvidia_smi_output="No devices were found") == CPU_INDEX


def test_a_gpu_takes_pips_default_index_and_the_setting_wins(tmp_path):
    assert _index(tmp_path, nvidia_smi_output="GPU 0: NVIDIA H200 (UUID: GPU-1)") == ""
    mirror = "https://mirror.example/simple"
    assert _index(tmp_path, MOETRON_TORCH_INDEX=mirror) == mirror
    assert _index(tmp_path, nvidia_smi_output="GPU 0: NVIDIA H200", MOETRON_TORCH_INDEX=mirror) == mirror


@pytest.mark.parametrize("folder", ["data", "exported", "my_texts", "my_tokenizer", "outputs"])
def test_folders_the_readme_creates_are_ignored_by_git(folder):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", f"{folder}/file"], cwd=REPO)
    assert done.returncode == 0, f"{folder}/ is not in .gitignore"
    assert subprocess.run(["git", "check-ignore", "-q", "src/data/windows.py"], cwd=REPO).returncode == 1

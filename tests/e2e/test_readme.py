"""Every command the README shows, run as written (a few steps instead of hundreds: overrides are
appended, and the run goes to a temporary folder). A command that cannot run here is listed in
SKIP with the reason."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHORT = "train.max_steps=2 logging.progress=false"
SKIP = {  # command prefix -> why this machine cannot run it
    "bash launch/test.sh": "the test suite itself (CI runs it)",
    "sbatch ": "needs a SLURM cluster",
    "moetron-train -m hydra/launcher=submitit_slurm": "needs a SLURM cluster (tests/e2e/test_submitit.py runs the "
                                                      "same path through submitit_local)",
    "pip install": "installs into the environment; launch/env.sh, which every launch script sources, does it",
    "git clone": "NVIDIA apex builds on CUDA machines only",
}


def readme_commands() -> list[tuple[str, str]]:
    """("bash", one command) per line of every bash block (continuations joined, comments dropped),
    and ("python", the block) per python block, in the README's order."""
    commands = []
    for match in re.finditer(r"^( *)```(bash|python)\n(.*?)^\1```", (REPO / "README.md").read_text(), re.M | re.S):
        body = textwrap.dedent(match.group(3))
        if match.group(2) == "python":
            commands.append(("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command:
                commands.append(("bash", command))
    return commands


def _skip_reason(command: str):
    if command == "bash launch/test.sh":
        return SKIP["bash launch/test.sh"]
    return next((why for prefix, why in SKIP.items() if prefix != "bash launch/test.sh" and command.startswith(prefix)),
                None)


def _as_run_here(i: int, command: str, tmp: Path) -> str:
    """The command with what makes it short appended, and what keeps its output in `tmp` where it
    would go elsewhere (a run directory it names itself lands in the user's folder: later commands
    read it, as the README's do)."""
    if "moetron-train" in command or "-m moetron.train" in command or command.startswith("bash launch/train.sh"):
        if "--cfg" in command:
            return command
        if "hydra.run.dir=" in command and not _in_repository(command):
            return f"{command} {SHORT}"
        folder = "hydra.sweep.dir" if re.search(r"moetron-train -m\b", command) else "hydra.run.dir"
        return f"{command} {SHORT} {folder}={tmp / f'command{i}'}"
    if command.startswith("bash benchmarks/gpu/multi_gpu_check.sh"):
        return f"{command} {tmp / 'gpu_checks'}"
    return command


def _in_repository(command: str) -> bool:
    """Commands that name the repository's files run from its root, as the README says."""
    return bool(re.search(r"(^| |=)(launch|benchmarks|tests)/|PYTHONPATH=\.", command))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's folder: the README's own-data example reads my_texts/*.jsonl."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_texts").mkdir()
    (folder / "my_texts" / "notes.jsonl").write_text("".join(
        f'{{"text": "note {i}: experts route tokens; the pipeline hides the exchange."}}\n' for i in range(200)))
    return folder


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    bash = [c for kind, c in COMMANDS if kind == "bash"]
    assert "bash launch/train.sh" in bash and "bash launch/test.sh" in bash  # the quick start's two
    assert sum("torchrun" in c for c in bash) >= 4 and any(kind == "python" for kind, _ in COMMANDS)


@pytest.mark.parametrize("i", range(len(COMMANDS)), ids=[c.split("\n")[0][:60] for _, c in COMMANDS])
def test_readme_command(i, workdir):
    kind, command = COMMANDS[i]
    reason = _skip_reason(command) if kind == "bash" else None
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "VIRTUAL_ENV": sys.prefix,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if kind == "python":
        args = [sys.executable, "-c", command]
    else:
        args = ["bash", "-c", _as_run_here(i, command, workdir)]
    cwd = REPO if _in_repository(command) else workdir
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    if "hydra.run.dir" in _as_run_here(i, command, workdir) and "--cfg" not in command:
        assert "done: step 2/" in proc.stdout, proc.stdout[-2000:]

"""Every command the README shows, run as written (a few steps instead of hundreds: overrides are
appended, and the run goes to a temporary folder). Commands that start moetron's own modules
(console scripts, `python -m moetron...`, torchrun lines) run with the same arguments on ranks
forked from a preloaded process (tests.forked_cli), as torchrun would start them. A command that cannot run here, or that another
test runs already, is listed in SKIP with the reason."""
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.forked_cli import run_module

REPO = Path(__file__).resolve().parents[2]
SHORT = "train.max_steps=2 logging.progress=false"
SKIP = {  # command prefix -> why this machine cannot run it, or which test runs it already
    "bash launch/test.sh": "the test suite itself (CI runs it)",
    "sbatch ": "needs a SLURM cluster",
    "moetron-train -m hydra/launcher=submitit_slurm": "needs a SLURM cluster (tests/e2e/test_submitit.py runs the "
                                                      "same path through submitit_local)",
    "pip install": "installs into the environment; launch/env.sh, which every launch script sources, does it",
    "git clone": "NVIDIA apex builds on CUDA machines only",
    # run elsewhere in the suite
    "bash launch/train.sh ": "the quick start's script with an override: `bash launch/train.sh` runs above",
    "python benchmarks/gpu/train_throughput.py": "tests/e2e/test_train_throughput.py runs it and reads its output",
    "moetron-plan stage=long_context_128k": "tests/unit/test_plan.py runs it and reads the layout it finds",
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
        if "--cfg" in command or "--check" in command:  # they print, and start no run
            return command
        if "hydra.run.dir=" in command and not _in_repository(command):
            return f"{command} {SHORT}"
        folder = "hydra.sweep.dir" if re.search(r"moetron-train -m\b", command) else "hydra.run.dir"
        return f"{command} {SHORT} {folder}={tmp / f'command{i}'}"
    if command.startswith("bash benchmarks/gpu/multi_gpu_check.sh"):  # a dry run on forked gloo ranks, of 4 steps
        return f"STEPS=4 LAUNCHER='python -m tests.forked_cli' {command} {tmp / 'gpu_checks'}"
    return command


CONSOLE_SCRIPTS = {"moetron-train": "moetron.train", "moetron-data": "moetron.data.cli",
                   "moetron-export": "moetron.train.export_cli", "moetron-generate": "moetron.train.generate_cli",
                   "moetron-plan": "moetron.plan.cli",
                   "moetron-report": "moetron.report.cli"}


def _as_forked(command: str, cwd: Path):
    """(module, arguments, ranks, environment) of a command that starts moetron's own module (a
    console script, `python -m moetron...`, or torchrun's `--nproc_per_node=N -m moetron.train`),
    with the shell's globs and leading VAR=value assignments applied; None for anything else."""
    if re.search(r"[|;&<>`$]", command):
        return None
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = str((cwd / value).resolve()) if name == "PYTHONPATH" else value
    nproc = 1
    if words[:2] == ["torchrun", "--standalone"] and re.match(r"^--nproc_per_node=\d+$", words[2]) \
            and words[3] == "-m":
        nproc, words = int(words[2].split("=")[1]), words[4:]
        env["OMP_NUM_THREADS"] = "1"
    elif words[:2] == ["python", "-m"] and words[2].startswith("moetron."):
        words = words[2:]
    elif words[0] in CONSOLE_SCRIPTS:
        words = [CONSOLE_SCRIPTS[words[0]], *words[1:]]
    else:
        return None
    module, arguments = words[0], []
    for word in words[1:]:
        matches = sorted(str(p.relative_to(cwd)) for p in cwd.glob(word)) if "*" in word else []
        arguments += matches or [word]
    return module, arguments, nproc, env


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
    forked = _as_forked(_as_run_here(i, command, workdir), cwd) if kind == "bash" else None
    if forked is not None:  # the same arguments, on ranks forked from this process (tests.forked_cli)
        module, arguments, nproc, env_extra = forked
        proc = run_module(module, arguments, cwd, nproc, env_extra={**env, **env_extra}, timeout=900)
    else:
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    if "hydra.run.dir" in _as_run_here(i, command, workdir) and "--cfg" not in command:
        assert "done: step 2/" in proc.stdout, proc.stdout[-2000:]

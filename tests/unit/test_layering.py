"""Imports go one way: a package of moetron imports only from packages below it (or itself), at
module level and inside functions alike. The order is the architecture (docs/DESIGN.md):

    core, profiling, plotting -> comm -> parallel -> precision -> models -> pipeline -> data ->
    checkpoint -> report -> train -> plan
"""
import ast
from pathlib import Path

import moetron

ORDER = ["core", "profiling", "plotting", "comm", "parallel", "precision", "models", "pipeline", "data",
         "checkpoint", "report", "train", "plan"]
LEVEL = {name: i for i, name in enumerate(ORDER)}
LEVEL.update({"profiling": 0, "plotting": 0})  # headless helpers beside core: they import no moetron package
SRC = Path(moetron.__file__).parent


def _imported_packages(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names if node.module == "moetron"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "moetron" and len(parts) > 1 and parts[1] in LEVEL:
                yield parts[1], node.lineno


def test_every_package_is_placed():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file() and p.name != "conf"}
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert packages | modules == set(ORDER)


def test_imports_go_one_way():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if own not in LEVEL:
            continue
        for package, line in _imported_packages(path):
            if LEVEL[package] > LEVEL[own]:
                wrong.append(f"{rel}:{line} ({own}) imports moetron.{package}")
    assert wrong == []

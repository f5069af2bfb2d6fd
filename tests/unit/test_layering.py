"""Imports go one way: a package of moetron imports only from packages below it (or itself), at
module level and inside functions alike. The order is the architecture (docs/DESIGN.md):

    core, profiling, plotting -> comm -> parallel -> precision -> models -> pipeline -> data ->
    checkpoint -> rl -> report -> train -> plan
"""
import ast
from pathlib import Path

import moetron

ORDER = ["core", "profiling", "plotting", "comm", "parallel", "precision", "models", "pipeline", "data",
         "checkpoint", "rl", "report", "train", "plan"]
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


# -- architectures live in moetron.models: the machinery around them names none ---------------------

MACHINERY = ["core", "comm", "parallel", "precision", "pipeline", "data", "checkpoint", "rl", "report", "train",
             "plan"]
# keys every decoder's config has (or a spec reads through ModelSpec): the machinery may name these
GENERIC_KEYS = {"arch", "vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "init_from",
                "num_attention_heads", "intermediate_size", "rope_theta", "rms_norm_eps", "initializer_range",
                "tie_word_embeddings", "rope_scaling",
                "num_experts"}  # also the routers' and dispatchers' own word (RouterSettings.num_experts)


def _architecture_packages() -> set[str]:
    return {p.name for p in (SRC / "models").iterdir() if (p / "__init__.py").is_file() and p.name != "common"}


def _architecture_keys() -> set[str]:
    import dataclasses

    from moetron.models.registry import registered_specs
    keys = set()
    for spec in registered_specs():
        keys |= {f.name for f in dataclasses.fields(spec.config_cls)}
    return keys - GENERIC_KEYS


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _names_in_code(tree):
    """(name, line) of every identifier, attribute, keyword and (non-docstring) string in the code."""
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id, node.lineno
        elif isinstance(node, ast.Attribute):
            yield node.attr, node.lineno
        elif isinstance(node, ast.keyword) and node.arg:
            yield node.arg, node.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.value, node.lineno


def test_the_machinery_names_no_architecture_nor_its_config_keys():
    """parallel, comm, pipeline, train, plan (and the other packages outside models) see an MoE
    decoder through the spec and the shared MoE protocol only: no import of an architecture's
    package, no architecture's name, no config key that only some architecture has."""
    from moetron.models.registry import registered_specs

    arch_packages = _architecture_packages()
    arch_names = {spec.arch for spec in registered_specs()} | arch_packages
    keys = _architecture_keys()
    assert {"n_group", "kv_lora_rank", "n_routed_experts", "first_k_dense_replace"} <= keys  # the test sees them
    wrong = []
    for package in MACHINERY:
        for path in sorted((SRC / package).rglob("*.py")):
            rel = path.relative_to(SRC)
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                           [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                for module in modules:
                    parts = module.split(".")
                    if parts[:2] == ["moetron", "models"] and len(parts) > 2 and parts[2] in arch_packages | {"hf"}:
                        wrong.append(f"{rel}:{node.lineno} imports {module}")
            for name, line in _names_in_code(tree):
                if name in keys or any(arch in name for arch in arch_names):
                    wrong.append(f"{rel}:{line} names {name!r}")
    assert wrong == []

"""Rebuild python_docs.jsonl from this interpreter's documentation (PSF-licensed text).

    python -m moetron.data.corpus.build_corpus

Documents: each pydoc topic, then, per pure-Python stdlib module, its module, class and function
docstrings joined. Read with `ast`, never imported. Stops near MAX_BYTES.
"""
from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path

MAX_BYTES = 3_000_000


def module_docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                title = "" if isinstance(node, ast.Module) else f"{node.name}\n\n"
                parts.append(title + doc)
    return "\n\n".join(parts)


def documents():
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts or path.name.startswith("_"):
            continue
        try:
            text = module_docstrings(path)
        except (SyntaxError, UnicodeDecodeError):
            continue
        if len(text) > 400:
            yield text


def main() -> None:
    out = Path(__file__).with_name("python_docs.jsonl")
    written = 0
    with out.open("w", encoding="utf-8") as f:
        for doc in documents():
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            if written + len(line) > MAX_BYTES:
                break
            f.write(line)
            written += len(line)
    print(f"wrote {out} ({written / 1e6:.2f} MB, Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()

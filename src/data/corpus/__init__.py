"""The corpus that ships with moetron: English documentation of the Python language and standard
library (the pydoc topics and the docstrings of the pure-Python stdlib modules of CPython 3.11),
redistributed under the PSF license in LICENSE-PSF.txt beside it. One JSON document per line.
`build_corpus.py` rebuilds it from the running interpreter."""
from importlib import resources

CORPUS_NAME = "python_docs"


def corpus_path():
    return resources.files(__name__).joinpath(f"{CORPUS_NAME}.jsonl")

# Sourced by launch/*.sh: activate (creating if needed) the project's virtual environment and install
# what moetron needs. TORCH_SPEC picks the torch build (default: the CPU build 2.13.0).
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  source .venv/bin/activate
fi
python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q --disable-pip-version-check -e ".[test]"

# Sourced by launch/*.sh: activate (creating if needed) the project's virtual environment and install
# what moetron needs, torch first, so that nothing else can pull a build this machine does not want.
#   TORCH_SPEC           the torch requirement (default torch==2.13.0)
#   MOETRON_TORCH_INDEX  the wheel index torch comes from. Unset: with no NVIDIA GPU (no nvidia-smi, or
#                        it lists none) PyTorch's CPU index, https://download.pytorch.org/whl/cpu (a
#                        ~200 MB build, no CUDA packages); with one, pip's default index (the CUDA build).
#                        Where the chosen index cannot be reached or lacks TORCH_SPEC, pip's default
#                        index is used instead, saying so.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  source .venv/bin/activate
fi
moetron_pip() { python -m pip install -q --disable-pip-version-check "$@"; }
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
torch_there() {  # the wanted torch is installed (a pinned version is read without starting pip)
  case "$torch_spec" in
    torch==*) python -c "import importlib.metadata as m, sys; v, want = m.version('torch'), sys.argv[1]
sys.exit((v if '+' in want else v.split('+')[0]) != want)" "${torch_spec#torch==}" 2>/dev/null ;;
    *) moetron_pip --no-index "$torch_spec" 2>/dev/null ;;
  esac
}
if ! torch_there; then  # not installed yet, or another version
  torch_index=$(bash launch/torch_index.sh)
  if [ -z "$torch_index" ]; then
    moetron_pip "$torch_spec"
  elif python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=5)" \
      "$torch_index" 2>/dev/null && moetron_pip --index-url "$torch_index" "$torch_spec"; then
    :
  else
    echo "moetron: $torch_spec is not available from $torch_index here; installing it from pip's default index" >&2
    moetron_pip "$torch_spec"
  fi
fi
# moetron itself, editable, with its test extras; skipped when this setup.py is what was installed last
stamp="$VIRTUAL_ENV/.moetron-setup-$(cksum < setup.py | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || ! python -c "import moetron, pytest" 2>/dev/null \
    || [ "$(python -c 'import moetron, os; print(os.path.dirname(os.path.realpath(moetron.__file__)))')" != "$(pwd -P)/src" ]; then
  moetron_pip -e ".[test]"
  rm -f "$VIRTUAL_ENV"/.moetron-setup-*
  touch "$stamp"
fi

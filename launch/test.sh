#!/usr/bin/env bash
# Run moetron's test suite on a fresh machine: makes .venv (unless one is active), installs the CPU
# build of torch (pinned, before anything can pull a CUDA build), moetron with its test extras, then
# pytest. Extra arguments go to pytest, e.g. `bash launch/test.sh tests/unit -k hf`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
python -m pytest -q --durations=15 "${@:-tests}"  # the slowest tests listed at the end

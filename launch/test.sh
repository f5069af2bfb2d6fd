#!/usr/bin/env bash
# Run moetron's test suite on a fresh machine: makes .venv (unless one is active), installs torch
# (pinned, first, so that nothing else pulls another build; the CPU build where there is no GPU:
# launch/env.sh), moetron with its test extras, then pytest, printing how long it took. Extra
# arguments go to pytest, e.g. `bash launch/test.sh tests/unit -k hf`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
start=$SECONDS
status=0
python -m pytest -q --durations=15 "${@:-tests}" || status=$?  # the slowest tests listed at the end
echo "launch/test.sh: pytest took $((SECONDS - start)) s (exit $status)"
exit $status

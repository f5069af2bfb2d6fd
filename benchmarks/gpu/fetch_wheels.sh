#!/usr/bin/env bash
# The wheels device_check.sh installs on the lent GPU machine, which has torch but no Hydra and no
# network: run here, in the repo root, before the device call (they land in .whl/, kept out of git).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
pip=${PIP:-python3 -m pip}
$pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d .whl hydra-core==1.3.8 omegaconf==2.3.1 \
    pytest==8.3.5 pluggy==1.5.0 iniconfig==2.0.0 packaging==24.2  # pytest: the CUDA-only tests
$pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # published as an sdist only
ls .whl

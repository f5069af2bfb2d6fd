#!/usr/bin/env bash
# Train the tiny DeepSeek-V3-style model on the shipped corpus, on this machine's CPUs (or GPU):
# makes .venv and installs moetron if needed, then runs moetron-train in outputs/quickstart.
# Running it again resumes from the newest checkpoint there. Extra arguments are Hydra overrides,
# e.g. `bash launch/train.sh train.max_steps=400 optim.lr=1e-3`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec moetron-train hydra.run.dir=outputs/quickstart "$@"

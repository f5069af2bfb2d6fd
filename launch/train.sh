#!/usr/bin/env bash
# Train the tiny DeepSeek-V3-style model on the shipped corpus: makes .venv and installs moetron if
# needed, then trains in outputs/quickstart. On a CPU it starts 4 gloo ranks as a DualPipeV pipeline
# of 2 stages x 2-way expert parallelism; with GPUs, one rank per GPU (data parallel).
# Running it again resumes from the newest checkpoint there. Extra arguments are Hydra overrides,
# e.g. `bash launch/train.sh train.max_steps=400 optim.lr=1e-3`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
# forward SLURM's SIGUSR1 too, and give the ranks time to finish the step and checkpoint (interrupts.py)
STOP="--signals-to-handle=SIGTERM,SIGINT,SIGUSR1 --shutdown-timeout=600"
if [ "$gpus" -gt 0 ]; then
  ranks=$gpus layout=()
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  ranks=4 layout=(parallel.pp=2 parallel.ep=2 parallel.schedule=dualpipev train.micro_batch=2)
fi
args=(hydra.run.dir=outputs/quickstart "${layout[@]}" "$@")
# every setting checked once, in one process, before any rank starts: a mistake is one message
python -m moetron.train --check --world-size "$ranks" "${args[@]}" || exit 2
exec torchrun --standalone --nproc_per_node="$ranks" $STOP -m moetron.train "${args[@]}"

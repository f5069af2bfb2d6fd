#!/usr/bin/env bash
# The wheel index torch is installed from (launch/env.sh): $MOETRON_TORCH_INDEX if set; else, with
# no NVIDIA GPU (no nvidia-smi, or it lists none), PyTorch's CPU index; else nothing (pip's default
# index, whose torch is the CUDA build).
if [ -n "${MOETRON_TORCH_INDEX:-}" ]; then
  echo "$MOETRON_TORCH_INDEX"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  echo ""
else
  echo "https://download.pytorch.org/whl/cpu"
fi

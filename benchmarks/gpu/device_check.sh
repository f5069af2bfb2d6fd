#!/usr/bin/env bash
# Everything owed on one GPU, in one call of the device tool (about 4 minutes on an H200):
#   here:  bash benchmarks/gpu/fetch_wheels.sh
#   then:  run(command="bash benchmarks/gpu/device_check.sh", carry=[".whl"], timeout_s=480)
# Results land in $OUT: env.txt, fb_streams.json (F&B pairs with a stream per chunk against
# autograd, benchmarks/gpu/fb_streams.py) and mini_metrics.jsonl + mini.log (the `mini` model
# trained by `python -m moetron.train` on this GPU: the trainer's first CUDA run, and its
# throughput), and mini_trace.json.gz: a torch.profiler trace of one step near the end
# (logging.profile; its step's time is not a throughput reading); fp8_linear.json (FP8 linear and
# grouped GEMMs against BF16 at DeepSeek-V3's shapes, and the torch backend against emulated,
# benchmarks/gpu/fp8_linear.py), fp8_test.log (the CUDA-only FP8 tests; te's when it is installed) and mini_fp8_metrics.jsonl
# (the same training with precision=fp8: its loss against BF16's and its throughput), and
# train_throughput.json (moetron eager, compiled and FP8 against transformers on mini, issue 18),
# packed_attention.json (FlexAttention's sample masks against causal FlashAttention, issue 27). On a CPU, the same plumbing in small:
#   DEVICE=cpu MODEL=tiny STEPS=3 SEQ=64 FB_ARGS="--hidden 64 --rows 64 --steps 3" bash benchmarks/gpu/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/moetron-device-check}
DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-mini} STEPS=${STEPS:-30} SEQ=${SEQ:-2048} FB_ARGS=${FB_ARGS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
site=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
fi
mkdir -p "$site/moetron" && cp -r src/. "$site/moetron/" && cp -r conf "$site/moetron/conf"  # as setup.py maps them
export PYTHONPATH="$site"
{ nvidia-smi 2>&1 || true; python3 -c "import sys, torch; print(sys.version); print('torch', torch.__version__, torch.version.cuda)"; } > "$OUT/env.txt" 2>&1

echo "== fb_streams"
timeout 150 python3 benchmarks/gpu/fb_streams.py --device "$DEVICE" $FB_ARGS --json > "$OUT/fb_streams.json" 2> "$OUT/fb_streams.err"
echo "rc=$?"; cat "$OUT/fb_streams.json"; tail -5 "$OUT/fb_streams.err"

echo "== fp8 linear"
if [ "$DEVICE" = cuda ]; then
    timeout 200 python3 benchmarks/gpu/fp8_linear.py --backend torch --json > "$OUT/fp8_linear.json" 2> "$OUT/fp8_linear.err"
    echo "rc=$?"; head -c 3000 "$OUT/fp8_linear.json"; tail -5 "$OUT/fp8_linear.err"
    timeout 120 python3 -m pytest -q tests/unit/test_fp8.py tests/unit/test_fp8_cache.py > "$OUT/fp8_test.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/fp8_test.log"
fi

echo "== packed attention: sample masking against causal (benchmarks/gpu/packed_attention.py, issue 27)"
if [ "$DEVICE" = cuda ]; then
    timeout 150 python3 benchmarks/gpu/packed_attention.py --json > "$OUT/packed_attention.json" 2> "$OUT/packed_attention.err"
    echo "rc=$?"; cat "$OUT/packed_attention.json"; tail -5 "$OUT/packed_attention.err"
fi

echo "== single-GPU throughput against transformers (benchmarks/gpu/train_throughput.py)"
if [ "$DEVICE" = cuda ]; then
    timeout 240 python3 benchmarks/gpu/train_throughput.py --json > "$OUT/train_throughput.json" 2> "$OUT/train_throughput.err"
    echo "rc=$?"; tail -c 1500 "$OUT/train_throughput.json"; tail -3 "$OUT/train_throughput.err"
fi

echo "== $MODEL training, $STEPS steps"
run_dir=$(mktemp -d)
cluster=(cluster=h200 cluster.gpus_per_node=1)
[ "$DEVICE" = cpu ] && cluster=()
timeout 300 python3 -m moetron.train "model=$MODEL" "${cluster[@]}" "train.max_steps=$STEPS" "train.seq_len=$SEQ" \
    train.micro_batch=8 train.global_batch=8 train.ckpt_every=1000000 logging.progress=false \
    logging.wandb.mode=disabled logging.profile.enabled=true "logging.profile.start_step=$((STEPS - 1))" \
    logging.profile.num_steps=1 "hydra.run.dir=$run_dir" > "$OUT/mini.log" 2>&1
echo "rc=$?"; tail -5 "$OUT/mini.log"
cp "$run_dir/metrics.jsonl" "$OUT/mini_metrics.jsonl" 2>/dev/null && tail -3 "$OUT/mini_metrics.jsonl"
gzip -c "$run_dir"/profile/rank0-*.json > "$OUT/mini_trace.json.gz" && ls -l "$OUT/mini_trace.json.gz"

echo "== $MODEL training with precision=fp8, $STEPS steps"
fp8_dir=$(mktemp -d)
timeout 300 python3 -m moetron.train "model=$MODEL" "${cluster[@]}" precision=fp8 "train.max_steps=$STEPS" \
    "train.seq_len=$SEQ" train.micro_batch=8 train.global_batch=8 train.ckpt_every=1000000 logging.progress=false \
    logging.wandb.mode=disabled "hydra.run.dir=$fp8_dir" > "$OUT/mini_fp8.log" 2>&1
echo "rc=$?"; tail -3 "$OUT/mini_fp8.log"
cp "$fp8_dir/metrics.jsonl" "$OUT/mini_fp8_metrics.jsonl" 2>/dev/null && tail -2 "$OUT/mini_fp8_metrics.jsonl"

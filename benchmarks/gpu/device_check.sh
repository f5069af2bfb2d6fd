#!/usr/bin/env bash
# Everything owed on one GPU, in calls of the device tool:
#   here:  bash benchmarks/gpu/fetch_wheels.sh
#   then:  run(command="SECTIONS='mini grpo packed' bash benchmarks/gpu/device_check.sh", carry=[".whl"],
#              timeout_s=420), and the other sections (fp8 mini_fp8 throughput fb) in a second call
# The results come back as one archive, $OUT/device_check.tgz, packed again after each section (the
# device tool returns a few files, and what a call that ran out of time left): env.txt, fb_streams.json (F&B pairs with a stream per chunk against
# autograd, benchmarks/gpu/fb_streams.py) and mini_metrics.jsonl + mini.log (the `mini` model
# trained by `python -m moetron.train` on this GPU: the trainer's first CUDA run, and its
# throughput), and mini_trace.json.gz: a torch.profiler trace of one step near the end
# (logging.profile; its step's time is not a throughput reading); fp8_linear.json (FP8 linear and
# grouped GEMMs against BF16 at DeepSeek-V3's shapes, and the torch backend against emulated,
# benchmarks/gpu/fp8_linear.py), fp8_test.log (the CUDA-only FP8 tests; te's when it is installed) and mini_fp8_metrics.jsonl
# (the same training with precision=fp8: its loss against BF16's and its throughput), and
# train_throughput.json (moetron eager, compiled and FP8 against transformers on mini, issue 18),
# packed_attention.json (FlexAttention's sample masks against causal FlashAttention, issue 27),
# grpo.log + grpo_metrics.jsonl (`stage=grpo` on tiny: rollouts, ratio, KL; issue 28). On a CPU, the same plumbing in small:
#   DEVICE=cpu MODEL=tiny STEPS=3 SEQ=64 FB_ARGS="--hidden 64 --rows 64 --steps 3" bash benchmarks/gpu/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/moetron-device-check}
DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-mini} STEPS=${STEPS:-30} SEQ=${SEQ:-2048} FB_ARGS=${FB_ARGS:-}
SECTIONS=${SECTIONS:-"mini grpo packed fp8 mini_fp8 throughput fb"}
mkdir -p "$OUT"
RESULTS=$(mktemp -d)  # every file of the sections; $OUT gets them as one archive after each section
pack() { tar czf "$OUT/device_check.tgz" -C "$RESULTS" . ; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
site=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
fi
mkdir -p "$site/moetron" && cp -r src/. "$site/moetron/" && cp -r conf "$site/moetron/conf"  # as setup.py maps them
export PYTHONPATH="$site"
{ nvidia-smi 2>&1 || true; python3 -c "import sys, torch; print(sys.version); print('torch', torch.__version__, torch.version.cuda)"; } > "$RESULTS/env.txt" 2>&1

pack

if want mini; then
echo "== $MODEL training, $STEPS steps"
run_dir=$(mktemp -d)
cluster=(cluster=h200 cluster.gpus_per_node=1)
[ "$DEVICE" = cpu ] && cluster=()
timeout 300 python3 -m moetron.train "model=$MODEL" "${cluster[@]}" "train.max_steps=$STEPS" "train.seq_len=$SEQ" \
    train.micro_batch=8 train.global_batch=8 train.ckpt_every=1000000 logging.progress=false \
    logging.wandb.mode=disabled logging.profile.enabled=true "logging.profile.start_step=$((STEPS - 1))" \
    logging.profile.num_steps=1 "hydra.run.dir=$run_dir" > "$RESULTS/mini.log" 2>&1
echo "rc=$?"; tail -5 "$RESULTS/mini.log"
cp "$run_dir/metrics.jsonl" "$RESULTS/mini_metrics.jsonl" 2>/dev/null && tail -1 "$RESULTS/mini_metrics.jsonl" | head -c 1500
gzip -c "$run_dir"/profile/rank0-*.json > "$RESULTS/mini_trace.json.gz" && ls -l "$RESULTS/mini_trace.json.gz"
pack
fi

if want grpo; then
echo "== GRPO on this device: tiny, rollouts with the KV cache, replayed routes, a reference (issue 28)"
grpo_dir=$(mktemp -d)
timeout 240 python3 -m moetron.train model=tiny stage=grpo rl.group_size=8 rl.prompts_per_step=16 \
    rl.max_new_tokens=32 rl.beta=0.04 rl.reward=tests.fakes.rewards:checksum train.max_steps=6 train.micro_batch=64 \
    optim.lr=1e-4 logging.progress=false logging.wandb.mode=disabled "hydra.run.dir=$grpo_dir" > "$RESULTS/grpo.log" 2>&1
echo "rc=$?"; tail -3 "$RESULTS/grpo.log"
cp "$grpo_dir/metrics.jsonl" "$RESULTS/grpo_metrics.jsonl" 2>/dev/null && python3 -c "
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    print({k: m[k] for k in ('step', 'step_time_s', 'rl/rollout_s', 'rl/ratio_mean', 'rl/clip_fraction', 'rl/kl',
                             'rl/reward_mean', 'moe/rollout_vs_train', 'memory/peak_gib') if k in m})" "$RESULTS/grpo_metrics.jsonl"
pack
fi

if want packed && [ "$DEVICE" = cuda ]; then
echo "== packed attention: sample masking against causal (benchmarks/gpu/packed_attention.py, issue 27)"
timeout 150 python3 benchmarks/gpu/packed_attention.py --json > "$RESULTS/packed_attention.json" 2> "$RESULTS/packed_attention.err"
echo "rc=$?"; cat "$RESULTS/packed_attention.json"; tail -5 "$RESULTS/packed_attention.err"
pack
fi

if want fp8 && [ "$DEVICE" = cuda ]; then
echo "== fp8 linear"
timeout 200 python3 benchmarks/gpu/fp8_linear.py --backend torch --json > "$RESULTS/fp8_linear.json" 2> "$RESULTS/fp8_linear.err"
echo "rc=$?"; head -c 3000 "$RESULTS/fp8_linear.json"; tail -5 "$RESULTS/fp8_linear.err"
timeout 120 python3 -m pytest -q -p no:timeout tests/unit/test_fp8.py tests/unit/test_fp8_cache.py > "$RESULTS/fp8_test.log" 2>&1; echo "rc=$?"; tail -3 "$RESULTS/fp8_test.log"
pack
fi

if want mini_fp8; then
echo "== $MODEL training with precision=fp8, $STEPS steps"
fp8_dir=$(mktemp -d)
cluster=(cluster=h200 cluster.gpus_per_node=1)
[ "$DEVICE" = cpu ] && cluster=()
timeout 300 python3 -m moetron.train "model=$MODEL" "${cluster[@]}" precision=fp8 "train.max_steps=$STEPS" \
    "train.seq_len=$SEQ" train.micro_batch=8 train.global_batch=8 train.ckpt_every=1000000 logging.progress=false \
    logging.wandb.mode=disabled "hydra.run.dir=$fp8_dir" > "$RESULTS/mini_fp8.log" 2>&1
echo "rc=$?"; tail -3 "$RESULTS/mini_fp8.log"
cp "$fp8_dir/metrics.jsonl" "$RESULTS/mini_fp8_metrics.jsonl" 2>/dev/null && tail -1 "$RESULTS/mini_fp8_metrics.jsonl" | head -c 1500
pack
fi

if want throughput && [ "$DEVICE" = cuda ]; then
echo "== single-GPU throughput against transformers (benchmarks/gpu/train_throughput.py)"
timeout 240 python3 benchmarks/gpu/train_throughput.py --json > "$RESULTS/train_throughput.json" 2> "$RESULTS/train_throughput.err"
echo "rc=$?"; tail -c 1500 "$RESULTS/train_throughput.json"; tail -3 "$RESULTS/train_throughput.err"
pack
fi

if want fb; then
echo "== fb_streams"
timeout 150 python3 benchmarks/gpu/fb_streams.py --device "$DEVICE" $FB_ARGS --json > "$RESULTS/fb_streams.json" 2> "$RESULTS/fb_streams.err"
echo "rc=$?"; cat "$RESULTS/fb_streams.json"; tail -5 "$RESULTS/fb_streams.err"
pack
fi
ls -l "$OUT"

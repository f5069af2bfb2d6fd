#!/usr/bin/env bash
# The multi-GPU checks that issues 4 and 5 still owe, on one node with >= 4 GPUs (8 for the EP8
# rows), as a user would run them (torchrun, NCCL). Results go to OUT (default outputs/gpu_checks):
# a run directory per row and checks.jsonl, one line per comparison (compare_runs.py).
#   bash benchmarks/gpu/multi_gpu_check.sh [OUT]
# 1. EP4 (hierarchical, alltoall) against one GPU, float32: the same loss curve (1e-4 relative:
#    CUDA's index_add and all-to-all sum in another order).
# 2. DualPipeV PP2 x EP2 with overlapped F&B pairs (collectives issued in turns under NCCL) and
#    DualPipe PP2 x DP2 against one GPU, float32; the DualPipeV run also writes profiler traces.
# 3. With DeepEP installed: parallel.dispatcher=deepep against hierarchical, bf16 (1e-2 relative).
# 4. With 8 GPUs: `mini` at EP8, bf16, alltoall and hierarchical: tokens/s of each. Inside one node
#    hierarchical is the flat exchange (no inter-node hop); timing its two hops against flat needs
#    EP across nodes (launch/slurm, cluster.nodes >= 2).
# 5. Overlapped gradient reduction under NCCL (issue 23): `mini` bf16 at dp4 (all-reduce), dp4 with
#    ZeRO-1 (reduce-scatter) and pp2 x dp2 zb1p, each with parallel.overlap_grad_reduce off and on:
#    the same losses bit for bit, and the median step time of each (steps 6-20) in overlap.txt.
# 6. Context parallelism under NCCL (issue 29): cp=2, cp=4 and cp=2 x ep=2 (experts folded over
#    4 ranks) against one GPU, float32 (1e-4 relative); `mini` bf16 on rows of 8,192 tokens at cp=1
#    (one GPU) and cp=4: memory/activations_gib, peak memory and tokens/s of each in context.txt.
# Without a GPU the same rows 1-2 run on 4 gloo ranks of the CPU (a dry run of the script).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/gpu_checks}
mkdir -p "$OUT"
export WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
cpu_only=$([ "$gpus" -eq 0 ] && echo 1 || echo 0)
[ "$cpu_only" = 1 ] && gpus=4
STEPS=${STEPS:-20}  # of rows 1-2 (the test suite's dry run of this script takes fewer)
# what starts the ranks of each row (the test suite's dry run forks them: python -m tests.forked_cli)
LAUNCHER=${LAUNCHER:-python -m torch.distributed.run --standalone}
SMALL=(model=tiny precision=fp32 train.max_steps=$STEPS train.seq_len=64 train.global_batch=16 train.micro_batch=2
       train.ckpt_every=1000000 logging.progress=false)
status=0

train() {  # train NAME NPROC OVERRIDES...
    local name=$1 nproc=$2; shift 2
    echo "== $name on $nproc rank(s)"
    $LAUNCHER --nproc_per_node="$nproc" -m moetron.train "$@" \
        "hydra.run.dir=$OUT/$name" > "$OUT/$name.log" 2>&1 || { echo "FAILED: see $OUT/$name.log"; status=1; }
}

check() {  # check REFERENCE RUN REL
    python benchmarks/gpu/compare_runs.py "$OUT/$1" "$OUT/$2" --rel "$3" | tee -a "$OUT/checks.jsonl" || status=1
}

if [ "$gpus" -lt 4 ]; then echo "needs 4 GPUs, found $gpus"; exit 2; fi
train one 1 "${SMALL[@]}"
for dispatcher in hierarchical alltoall; do
    train "ep4_$dispatcher" 4 "${SMALL[@]}" parallel.ep=4 "parallel.dispatcher=$dispatcher"
    check one "ep4_$dispatcher" 1e-4
done
# with a profiler trace of two steps mid-run (10-11) on every rank (pp2ep2_dualpipev/profile): which exchange
# overlaps which computation, per CUDA stream
train pp2ep2_dualpipev 4 "${SMALL[@]}" parallel.pp=2 parallel.ep=2 parallel.schedule=dualpipev \
    logging.profile.enabled=true logging.profile.start_step=$((STEPS / 2)) "logging.profile.ranks=[]"
check one pp2ep2_dualpipev 1e-4
train pp2dp2_dualpipe 4 "${SMALL[@]}" parallel.pp=2 parallel.schedule=dualpipe
check one pp2dp2_dualpipe 1e-4

if [ "$cpu_only" = 0 ] && python -c "import deep_ep" 2>/dev/null; then
    BF16=("${SMALL[@]/precision=fp32/precision=bf16}")
    for dispatcher in hierarchical deepep; do
        train "ep4_bf16_$dispatcher" 4 "${BF16[@]}" parallel.ep=4 "parallel.dispatcher=$dispatcher"
    done
    check ep4_bf16_hierarchical ep4_bf16_deepep 1e-2
fi

if [ "$cpu_only" = 0 ] && [ "$gpus" -ge 8 ]; then
    MINI=(model=mini precision=bf16 train.max_steps=30 train.seq_len=2048 train.global_batch=64
          train.micro_batch=8 train.ckpt_every=1000000 logging.progress=false cluster=h200)
    for dispatcher in alltoall hierarchical; do
        train "mini_ep8_$dispatcher" 8 "${MINI[@]}" parallel.ep=8 "parallel.dispatcher=$dispatcher"
    done
    check mini_ep8_alltoall mini_ep8_hierarchical 1e-2
fi
if [ "$cpu_only" = 0 ]; then
    OVERLAP=(model=mini precision=bf16 train.max_steps=20 train.seq_len=2048 train.global_batch=32
             train.micro_batch=4 train.ckpt_every=1000000 logging.progress=false cluster=h200)
    for layout in "dp4 parallel.zero1=false" "dp4_zero1 parallel.zero1=true" \
                  "pp2dp2_zb1p parallel.zero1=false parallel.pp=2 parallel.schedule=zb1p"; do
        read -r name extra <<< "$layout"
        for overlap in false true; do
            train "overlap_${name}_$overlap" 4 "${OVERLAP[@]}" $extra \
                "parallel.overlap_grad_reduce=$overlap"
        done
        check "overlap_${name}_false" "overlap_${name}_true" 0
        python -c "import json, statistics, sys
t = {o: statistics.median(json.loads(l)['step_time_s'] for l in list(open(f'$OUT/overlap_${name}_{o}/metrics.jsonl'))[5:])
     for o in ('false', 'true')}
print('$name', 'off', round(t['false'], 4), 'on', round(t['true'], 4), 'on/off', round(t['true'] / t['false'], 3))" \
            | tee -a "$OUT/overlap.txt"
    done
fi
if [ "$cpu_only" = 0 ]; then
    for layout in "cp2 2 parallel.cp=2" "cp4 4 parallel.cp=4" "cp2ep2 4 parallel.cp=2 parallel.ep=2"; do
        read -r name nproc extra <<< "$layout"
        train "$name" "$nproc" "${SMALL[@]}" $extra
        check one "$name" 1e-4
    done
    LONG=(model=mini precision=bf16 train.max_steps=12 train.seq_len=8192 model.max_position_embeddings=8192
          train.global_batch=4 train.micro_batch=1 train.ckpt_every=1000000 logging.progress=false cluster=h200)
    train long_cp1 1 "${LONG[@]}"
    train long_cp4 4 "${LONG[@]}" parallel.cp=4
    for name in long_cp1 long_cp4; do
        python -c "import json, statistics
rows = [json.loads(l) for l in list(open('$OUT/$name/metrics.jsonl'))[4:]]
print('$name', {k: round(statistics.median(r[k] for r in rows), 3) for k in
      ('memory/activations_gib', 'memory/peak_gib', 'throughput/tokens_per_s', 'step_time_s')})" \
            | tee -a "$OUT/context.txt"
    done
fi
echo "checks: $OUT/checks.jsonl (status $status)"
exit $status

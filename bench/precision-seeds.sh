#!/usr/bin/env bash
# f32 against mixed precision across seeds (issue 20 point 5), in one command: docs/RESULTS.md
# run 3's model and settings (full attention, batch 4), every (precision, seed) pair trained at
# once (on one GPU, or GPUS of them), then one evaluation of all the checkpoints, whose report holds every
# training log (validation CE every 100 steps; f16 logs also carry the loss scale and the steps
# it dropped). The plot of the curves: `sparse-attn eval --reports OUTDIR/eval.json --plots DIR`.
#
#   bench/precision-seeds.sh [OUTDIR]
#
# BIN (default target/release/sparse-attn; build it with --features burn-vulkan for f16 on
# tensor cores), DATA (default data/shakespeare), SEEDS (default "1 2"), PRECISIONS (default
# "f32 f16"), GPUS (above 1: the runs spread round-robin over that many discrete adapters, as
# bench/nosa-experiment.sh does; default: the one adapter the binary picks), STEPS (default
# 1200), LIMIT (seconds each run may train, default 450: the GPU machine cuts a command off at
# 10 minutes; a run stopped early keeps its checkpoint and says so), WINDOWS (validation
# windows, default 16). On the H200 four f16 runs at once take ~180 s
# for 1200 steps, four f32 runs 0.5 s a step (~955 steps in 480 s): one precision per call. The
# evaluation's table ends with the validation CE across seeds, step by step (mean, standard
# deviation, and for two configurations their difference and Welch's t); reports of several
# calls combine with `sparse-attn eval --reports A/eval.json B/eval.json`.
set -euo pipefail
out=${1:-bench/results/precision-seeds}
bin=${BIN:-target/release/sparse-attn}
data=${DATA:-data/shakespeare}
seeds=${SEEDS:-1 2}
precisions=${PRECISIONS:-f32 f16}
windows=${WINDOWS:-16}
gpus=${GPUS:-1}
model=(--mode full --d-model 384 --layers 6 --heads 8 --kv-heads 2 --d-ff 1024 --seq 2048
       --batch 4 --block 16 --topk 16 --lr 1e-3 --min-lr 1e-4 --warmup 200 --eval-every 100
       --eval-windows "$windows" --ckpt-every 0 --steps "${STEPS:-1200}"
       --time-limit "${LIMIT:-450}")
mkdir -p "$out"
ckpts=()
pids=()
i=0
for p in $precisions; do
    for s in $seeds; do
        name="$p-s$s"
        ckpts+=("$out/$name")
        if [ "$gpus" -gt 1 ]; then
            export SPARSE_ATTN_ADAPTER="discrete,#$(( i % gpus ))"
        fi
        "$bin" train "${model[@]}" --data "$data" --precision "$p" --seed "$s" --out "$out/$name" \
            > "$out/train-$name.json" \
            2> >(tr '\r' '\n' | grep -v XDG_RUNTIME_DIR | grep -E 'valid|stopping|error|on ' \
                 > "$out/train-$name.log") &
        pids+=($!)
        i=$(( i + 1 ))
    done
done
failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
done
[ "$failed" = 0 ] || echo "a training run failed (see $out/train-*.log); evaluating the rest" >&2
done_ckpts=()
for c in "${ckpts[@]}"; do
    [ -d "$c" ] && done_ckpts+=("$c")
done
# Validation CE at the training length only: the comparison uses neither the budget sweep nor
# length extrapolation.
"$bin" eval --ckpt "${done_ckpts[@]}" --data "$data" --windows "$windows" --out "$out/eval.json" \
    --budgets 1 --lengths 1 --passkeys 1 \
    2> >(grep -v XDG_RUNTIME_DIR >&2)
# The checkpoints stay in OUTDIR; the report, the logs and the JSON lines are what to keep.

#!/usr/bin/env bash
# f32 against mixed precision across seeds (issue 20 point 5), in one command: docs/RESULTS.md
# run 3's model and settings (full attention, batch 4), every (precision, seed) pair trained at
# once on the one GPU, then one evaluation of all the checkpoints, whose report holds every
# training log (validation CE every 100 steps; f16 logs also carry the loss scale and the steps
# it dropped). The plot of the curves: `sparse-attn eval --reports OUTDIR/eval.json --plots DIR`.
#
#   bench/precision-seeds.sh [OUTDIR]
#
# BIN (default target/release/sparse-attn; build it with --features burn-vulkan for f16 on
# tensor cores), DATA (default data/shakespeare), SEEDS (default "1 2"), PRECISIONS (default
# "f32 f16"), STEPS (default 1200), LIMIT (seconds each run may train, default 450: the GPU
# machine cuts a command off at 10 minutes; a run stopped early keeps its checkpoint and says
# so), WINDOWS (validation windows, default 16). On the H200, four runs at once took 400 s for
# ~1190 f32 steps and ~300 s for 1200 f16 steps; for more seeds run one precision per call.
set -euo pipefail
out=${1:-bench/results/precision-seeds}
bin=${BIN:-target/release/sparse-attn}
data=${DATA:-data/shakespeare}
seeds=${SEEDS:-1 2}
precisions=${PRECISIONS:-f32 f16}
windows=${WINDOWS:-16}
model=(--mode full --d-model 384 --layers 6 --heads 8 --kv-heads 2 --d-ff 1024 --seq 2048
       --batch 4 --block 16 --topk 16 --lr 1e-3 --min-lr 1e-4 --warmup 200 --eval-every 100
       --eval-windows "$windows" --ckpt-every 0 --steps "${STEPS:-1200}"
       --time-limit "${LIMIT:-450}")
mkdir -p "$out"
ckpts=()
pids=()
for p in $precisions; do
    for s in $seeds; do
        name="$p-s$s"
        ckpts+=("$out/$name")
        "$bin" train "${model[@]}" --data "$data" --precision "$p" --seed "$s" --out "$out/$name" \
            > "$out/train-$name.json" \
            2> >(tr '\r' '\n' | grep -v XDG_RUNTIME_DIR | grep -E 'valid|stopping|error|on ' \
                 > "$out/train-$name.log") &
        pids+=($!)
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
"$bin" eval --ckpt "${done_ckpts[@]}" --data "$data" --windows "$windows" --out "$out/eval.json" \
    2> >(grep -v XDG_RUNTIME_DIR >&2) | tail -n "$(( ${#done_ckpts[@]} + 2 ))"
# The checkpoints stay in OUTDIR; the report, the logs and the JSON lines are what to keep.

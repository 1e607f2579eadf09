#!/usr/bin/env bash
# The SSA reproduction at small scale (docs/RESULTS.md): train one model and evaluate it, in one
# go, so that a machine that limits how long a command runs (10 minutes on the lent GPU
# machine) and returns only small files still yields the report. Run it once per mode with the
# same STEPS and SEED; then combine the reports here:
#
#   bench/train-experiment.sh MODE STEPS [OUTDIR] [extra train flags...]
#   sparse-attn eval --reports OUTDIR/eval-{full,sparse,ssa}.json --out docs/results/eval.json \
#       --plots docs/results
#
# BIN (default target/release/sparse-attn) and DATA (default data/shakespeare) can be set; NAME
# (default MODE) names the run's folder and files when one mode runs with several settings.
set -euo pipefail
mode=$1
steps=$2
out=${3:-runs}
shift $(( $# < 3 ? $# : 3 ))
bin=${BIN:-target/release/sparse-attn}
data=${DATA:-data/shakespeare}
# The experiment's model: 10.3M parameters, GQA 8:2, context 2048, RF 256 (B 16 x k 16): the
# budget sweep reaches 8x (2048 = the whole context) and extrapolation 4x (8192).
model=(--d-model 384 --layers 6 --heads 8 --kv-heads 2 --d-ff 1024 --seq 2048 --batch 4
       --block 16 --topk 16 --lr 1e-3 --min-lr 1e-4 --warmup 200 --seed 1
       --eval-every 250 --eval-windows 32 --ckpt-every 0)
name=${NAME:-$mode}
mkdir -p "$out"
"$bin" train --mode "$mode" --steps "$steps" --data "$data" --out "$out/$name" "${model[@]}" "$@" \
    2> >(tr '\r' '\n' | grep -v XDG_RUNTIME_DIR | grep -E 'valid|stopping|resum|error|on ' >&2) \
    | tee "$out/train-$name.json"
"$bin" eval --ckpt "$out/$name" --data "$data" --out "$out/eval-$name.json" \
    --plots "$out/plots-$name" --windows 32 --passkeys 32 --batch 4 2>&1 | grep -v XDG_RUNTIME_DIR

#!/usr/bin/env bash
# Causal selection and NOSA at small scale (docs/RESULTS.md): six models trained identically
# (bench/train-experiment.sh's model, seed and schedule), all at once, spread over the GPUs of
# one machine (several processes per GPU: at this size a step leaves the GPU mostly idle), each
# trained then evaluated:
#   full, sparse, ssa            the SSA experiment again (SSA block scoring, now causal)
#   sparse-infllm                sparse-only with InfLLM-V2 scoring and NOSA's forced blocks
#   nosa, nosa-ssa               NOSA's eviction head and selection (sparse-only; SSA's streams)
# The three InfLLM-V2/NOSA models share the budget: 16 blocks of 16 = 1 initial + 2 local +
# the current one + 4 by the query (+ 8 by the eviction head for the NOSA modes).
#
#   bench/nosa-experiment.sh STEPS OUTDIR [GPUS]
#   sparse-attn eval --reports OUTDIR/eval-*.json --out docs/results/nosa.json --plots DIR
#
# Every run gets --time-limit LIMIT seconds (default 420) as a guard so that the evaluations
# finish inside a 10-minute command; a run that hits it reports the step it reached.
set -uo pipefail
steps=$1
out=$2
gpus=${3:-1}
limit=${LIMIT:-420}
mkdir -p "$out"
nosa=(--n-init 1 --n-local 2 --k-query 4)
runs=(
    "full full"
    "sparse sparse"
    "ssa ssa"
    "sparse-infllm sparse --scoring infllm-v2 --n-init 1 --n-local 2"
    "nosa nosa ${nosa[*]}"
    "nosa-ssa nosa-ssa ${nosa[*]}"
)
i=0
for r in "${runs[@]}"; do
    set -- $r
    name=$1
    mode=$2
    shift 2
    g=$(( i % gpus ))
    ( SPARSE_ATTN_ADAPTER="discrete,#$g" NAME=$name \
        bash "$(dirname "$0")/train-experiment.sh" "$mode" "$steps" "$out" \
        --time-limit "$limit" "$@" > "$out/log-$name.txt" 2>&1
      echo "$name: exit $?" >> "$out/status.txt" ) &
    i=$(( i + 1 ))
done
wait
cat "$out/status.txt"

#!/usr/bin/env bash
# Decoding with trained weights (docs/BENCHMARKS.md, issue 17): train the experiment's model
# (bench/train-experiment.sh's) with InfLLM-V2's query-only selection and with NOSA's, then
# generate from each with the KV cache offloaded, the fewest GPU slots (one per selected
# block), greedy: the hit rate is what the trained selection gives, token after token.
#
#   bench/decode-experiment.sh STEPS TOKENS OUTDIR
#
# BIN (default target/release/sparse-attn) and DATA (default data/shakespeare) can be set.
set -euo pipefail
steps=$1
tokens=$2
out=$3
bin=${BIN:-target/release/sparse-attn}
data=${DATA:-data/shakespeare}
model=(--d-model 384 --layers 6 --heads 8 --kv-heads 2 --d-ff 1024 --seq 2048 --batch 4
       --block 16 --topk 16 --lr 1e-3 --min-lr 1e-4 --warmup 200 --seed 1
       --eval-every 0 --ckpt-every 0 --n-init 1 --n-local 2 --scoring infllm-v2)
mkdir -p "$out"
"$bin" train --mode sparse --steps "$steps" --data "$data" --out "$out/infllm" "${model[@]}" \
    2>/dev/null | tee "$out/train-infllm.json"
"$bin" train --mode nosa --steps "$steps" --data "$data" --out "$out/nosa" "${model[@]}" \
    --k-query 4 2>/dev/null | tee "$out/train-nosa.json"
# The first work is validation text (every 10th from the first): not seen in training.
prompt=$(head -c 400 "$data"/$(ls "$data" | sed -n 1p))
for run in "infllm sparse" "nosa nosa"; do
    set -- $run
    for where in "" "--offload"; do
        "$bin" generate --ckpt "$out/$1" --attention "$2" $where --prompt "$prompt" \
            --tokens "$tokens" --temperature 0 > "$out/text-$1${where:+-offload}.txt" \
            2> >(grep -v XDG_RUNTIME_DIR | tee "$out/summary-$1${where:+-offload}.txt" >&2)
    done
done

#!/usr/bin/env bash
# NOSA's kernel costs on one GPU (docs/BENCHMARKS.md, "NOSA"): the biased sparse backward against
# the unbiased one, and NOSA's selection against InfLLM-V2's and SSA's, at 16k tokens, d 128,
# 16 query heads per kv head (the peer shape of bench/peers.sh), blocks of 16, k = 16; f16
# (tensor-core backward where the device has it) and f32 (portable kernels). One JSON line per
# run into OUT (default bench-nosa.jsonl).
#
#   bench/nosa-bench.sh [OUT]        BIN (default target/release/sparse-attn) can be set.
set -euo pipefail
bin=${BIN:-target/release/sparse-attn}
out=${1:-bench-nosa.jsonl}
shape=(--batch 4 --heads 16 --kv-heads 1 --seq 16384 --head-dim 128 --block 16 --topk 16
       --target-seconds 0.3 --stages --json-out "$out")
forced=(--n-init 1 --n-local 2)
for dtype in f16 f32; do
    echo "== $dtype: SSA selection (today's default), no bias"
    "$bin" bench sparse "${shape[@]}" --dtype "$dtype"
    echo "== $dtype: InfLLM-V2 selection with NOSA's forced blocks, no bias"
    "$bin" bench sparse "${shape[@]}" --dtype "$dtype" --scoring infllm-v2 "${forced[@]}"
    echo "== $dtype: the same with a per-key bias (sparse forward and backward with d bias)"
    "$bin" bench sparse "${shape[@]}" --dtype "$dtype" --scoring infllm-v2 "${forced[@]}" --bias
    echo "== $dtype: NOSA: 4 blocks by the query + 8 by the eviction score, with the bias"
    "$bin" bench sparse "${shape[@]}" --dtype "$dtype" --scoring infllm-v2 "${forced[@]}" \
        --k-query 4 --bias
done 2>&1 | grep -v XDG_RUNTIME_DIR

#!/usr/bin/env bash
# The block-sparse benchmark sweep recorded in docs/BENCHMARKS.md.
#   bench/sparse-sweep.sh [BINARY] [OUT_DIR]
# Selection + sparse forward and backward against the dense causal kernels, SSA's GQA 16:1,
# head_dim 128, k = 16, blocks of 64 and of 16, with the per-kernel breakdown (--stages).
# Prints the tables and appends the raw results to OUT_DIR/sparse-<date>.jsonl.
set -euo pipefail
bin="${1:-target/release/sparse-attn}"
out="${2:-bench/results}"
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
for b in 64 16; do
    "$bin" bench sparse --seq 4096,8192,16384,32768 --heads 16 --kv-heads 1 --head-dim 128 \
        --block "$b" --topk 16 --stages --target-seconds 0.2 \
        --json-out "$out/sparse-$(date -u +%Y-%m-%d).jsonl"
done

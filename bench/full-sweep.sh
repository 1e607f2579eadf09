#!/usr/bin/env bash
# The full-attention benchmark sweep recorded in docs/BENCHMARKS.md.
#   bench/full-sweep.sh [BINARY] [OUT_DIR] [HEAD_DIMS]
# Prints the tables and appends the raw results (one JSON object per head dim) to
# OUT_DIR/full-<date>.jsonl.
set -euo pipefail
bin="${1:-target/release/sparse-attn}"
out="${2:-bench/results}"
dims="${3:-128 64}"
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
"$bin" info | head -1
for d in $dims; do
    "$bin" bench full --seq 1024,2048,4096,8192,16384 --head-dim "$d" --heads 16 --mask both \
        --variant all --target-seconds 0.1 --json-out "$out/full-$(date -u +%Y-%m-%d).jsonl"
done

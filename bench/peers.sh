#!/usr/bin/env bash
# The peer benchmark of docs/BENCHMARKS.md, in one command on the GPU machine:
#   bench/peers.sh [BINARY] [OUT_DIR] [SEQS] [HEAD_DIMS]
# Times our kernels (f16 and f32; dense and block-sparse at SSA's settings), then PyTorch's SDPA,
# FlexAttention and fla's NSA kernel on the same shapes (bench/peers.py), and prints one table.
# Needs python3 with torch and fla-core (carry its wheel: docs/BENCHMARKS.md says how).
set -euo pipefail
bin="${1:-target/release/sparse-attn}"
out="${2:-bench/results/peers}"
seqs="${3:-4096,8192,16384,32768}"
dims="${4:-64,128}"
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
rm -f "$out/ours-full.jsonl" "$out/ours-sparse.jsonl"
"$bin" bench full --seq "$seqs" --head-dim "$dims" --heads 16 --mask causal \
    --variant f16:coop,f16:xl,f16p:xl,xl --target-seconds 0.2 --json-out "$out/ours-full.jsonl"
"$bin" bench sparse --seq "$seqs" --head-dim "$dims" --heads 16 --kv-heads 1 --block 16 \
    --topk 16 --dtype f16 --target-seconds 0.2 --json-out "$out/ours-sparse.jsonl"
PYTHONUNBUFFERED=1 python3 "$(dirname "$0")/peers.py" --ours-full "$out/ours-full.jsonl" \
    --ours-sparse "$out/ours-sparse.jsonl" --out "$out/peers.json" ${PEERS_FLEX:+--flex "$PEERS_FLEX"} \
    2> >(tee "$out/peers.err" >&2) | tee "$out/peers.txt"

#!/usr/bin/env bash
# Dense attention's xl tiles at the training model's shape (issue 20 point 4: batch 16, 8 query /
# 2 kv heads, 2048 tokens, head_dim 48, causal), one kernel's tile at a time through
# SPARSE_ATTN_TILES (tm,cols,dc,pc; src/ops/tiles.rs), f32: which tiles the defaults should be.
# Settings `score:...` (and `default-score`) time the selection's block-score tile instead
# (bench sparse at the same shape, blocks of 16, k = 16).
#
#   bench/train-tiles-sweep.sh BIN OUT_DIR
#   SETTINGS="default fwd:4,64,16,16 ..." bench/train-tiles-sweep.sh ...   # other settings
#
# Each setting appends a JSON line to OUT_DIR/tiles.jsonl; tiles.txt has the table rows.
set -euo pipefail
bin=$1
out=$2
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
default_settings="default fwd:4,64,16,16 fwd:8,32,16,16 fwd:4,32,16,8 fwd:8,64,8,16
    fwd:2,64,16,16 dq:8,64,16,16 dq:4,32,16,16 dq:2,64,16,16 dq:4,64,8,8 dq:8,32,16,16
    dkdv:4,32,8,8 dkdv:4,64,8,8 dkdv:8,64,8,8 dkdv:2,32,8,8 dkdv:8,32,16,8 dkdv:4,32,16,16
    dkdv:8,16,8,8 dkdv:2,64,8,8 dkdv:4,16,8,8"
read -r -a settings <<< "$(echo ${SETTINGS:-$default_settings})"
shape=(--batch 16 --heads 8 --kv-heads 2 --seq 2048 --head-dim 48)
for s in "${settings[@]}"; do
    if [ "$s" = default ]; then unset SPARSE_ATTN_TILES; else export SPARSE_ATTN_TILES=$s; fi
    echo "== $s" | tee -a "$out/tiles.txt"
    if [ "${s%%:*}" = score ] || [ "$s" = default-score ]; then
        # The block-score tile: the selection's time ("select ms") of bench sparse.
        [ "$s" = default-score ] && unset SPARSE_ATTN_TILES
        "$bin" bench sparse "${shape[@]}" --block 16 --topk 16 --no-backward --target-seconds 0.2 \
            --json-out "$out/tiles.jsonl" 2>>"$out/tiles.err" | grep -E '^16 ' \
            | tee -a "$out/tiles.txt" || echo "(failed: see tiles.err)" | tee -a "$out/tiles.txt"
        continue
    fi
    "$bin" bench full --batch 16 --heads 8 --kv-heads 2 --seq 2048 --head-dim 48 --mask causal \
        --variant xl --target-seconds 0.2 --json-out "$out/tiles.jsonl" 2>>"$out/tiles.err" \
        | grep -E '^f32' | tee -a "$out/tiles.txt" || echo "(failed: see tiles.err)" | tee -a "$out/tiles.txt"
done

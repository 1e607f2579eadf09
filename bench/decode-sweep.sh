#!/usr/bin/env bash
# Full attention's decoding kernel over its tuning knob (SPARSE_ATTN_DECODE=vu,kcv,spk,workgroups,
# kwide: V rows loaded ahead, K vec4 per load round, keys per workgroup at most, workgroups
# a step aims for, 16-byte K loads; src/decode/attention.rs), one setting at a time from the
# defaults, at 32k context, batch 1 and 16: which setting reads the cache closest to the
# memory's bandwidth.
#
#   bench/decode-sweep.sh BIN OUT_DIR [BANDWIDTH_GBS]
#   SETTINGS="default 16,8,256,1024,0" bench/decode-sweep.sh ...   # other settings
#
# Each setting appends one JSON line to OUT_DIR/sweep.jsonl (its "knob" is in sweep.txt).
set -euo pipefail
bin=$1
out=$2
bw=${3:-4800}
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
default_settings="default 16,8,256,512 16,8,256,2048 16,4,256,1024 16,16,256,1024 8,8,256,1024
    32,8,256,1024 16,8,512,1024 16,8,256,1024,0"
read -r -a settings <<< "$(echo ${SETTINGS:-$default_settings})"
for s in "${settings[@]}"; do
    echo "== SPARSE_ATTN_DECODE=$s" | tee -a "$out/sweep.txt"
    if [ "$s" = default ]; then unset SPARSE_ATTN_DECODE; else export SPARSE_ATTN_DECODE=$s; fi
    "$bin" bench decode --modes full --batch 1,16 --context 32768 --layers 32 --steps 8 \
        --bandwidth-gbs "$bw" --json-out "$out/sweep.jsonl" 2>>"$out/sweep.err" \
        | grep -E '^\(a\)' | tee -a "$out/sweep.txt"
done

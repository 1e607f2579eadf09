#!/usr/bin/env bash
# Training throughput against PyTorch on the same GPU, in one command (issue 20): the model of
# docs/RESULTS.md (10.3M parameters, d_model 384, 6 layers, 8 query / 2 kv heads, d_ff 1024,
# context 2048) trained by `sparse-attn bench train` in each of our modes and by
# bench/train_peers.py in PyTorch (eager fp32, eager bf16 autocast, torch.compile bf16), at the
# same batch sizes; then one table with the ratios and our kernels' share of each step.
#
#   bench/train-peers.sh [OUTDIR]
#
# BIN (default target/release/sparse-attn, built with --features train), DATA (default
# data/shakespeare: scripts/fetch-corpus.sh), BATCHES (default "4 16 64"), MODES (default
# full,sparse,ssa,nosa), STEPS (timed steps, default 10), PY (default python3, with torch),
# ONLY (ours or torch: one side, then the table of what OUTDIR holds; for machines that cut
# commands off at 10 minutes), PRECISIONS (default "f32"; "f32 f16" times ours in both:
# build BIN with --features burn-vulkan for Burn's f16 products on tensor cores), EXTRA (more
# flags for ours).
set -euo pipefail
out=${1:-bench/results/train-peers}
bin=${BIN:-target/release/sparse-attn}
data=${DATA:-data/shakespeare}
batches=${BATCHES:-4 16 64}
modes=${MODES:-full,sparse,ssa,nosa}
steps=${STEPS:-10}
py=${PY:-python3}
here=$(dirname "$0")
mkdir -p "$out"
model=(--seq 2048 --d-model 384 --layers 6 --heads 8 --kv-heads 2 --d-ff 1024 --block 16
       --topk 16)
only=${ONLY:-}
for b in $batches; do
    [ "$only" = torch ] && break
    for p in ${PRECISIONS:-f32}; do
        echo "== ours, batch $b, $p" >&2
        "$bin" bench train --modes "$modes" --batch "$b" "${model[@]}" --data "$data" \
            --timed-steps "$steps" --precision "$p" ${EXTRA:-} --json \
            2> >(grep -v XDG_RUNTIME_DIR >&2) > "$out/ours-b$b-$p.txt" \
            || echo "ours at batch $b ($p) failed (kept going)" >&2
    done
done
if [ "$only" != ours ]; then
    echo "== PyTorch" >&2
    "$py" "$here/train_peers.py" --batches "$(echo $batches | tr ' ' ',')" --steps "$steps" \
        --out "$out/torch.json"
fi
[ -f "$out/torch.json" ] || exit 0
"$py" "$here/train_peers.py" --merge "$out" | tee "$out/table.md"

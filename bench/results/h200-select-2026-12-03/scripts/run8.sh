#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s25
xz -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa; mkdir -p /tmp/gt; xz -dc $D/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
(cd /tmp/gt && SPARSE_ATTN_GPU_CHECK=1 timeout 150 ./suite --test-threads 1 select:: train_ops::selection 2>&1 | grep -E "^test |result|panicked|seed" > $OUT/check.txt); tail -1 $OUT/check.txt; grep -v " ok$" $OUT/check.txt | head
for r in 1 2; do
timeout 60 /tmp/sa bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages --no-backward --pipeline-stats > $OUT/stages-$r.txt 2>&1
grep -E "ms  \(" $OUT/stages-$r.txt; grep -A1 '^block_scores_coop.wgsl' $OUT/stages-$r.txt | tail -1
done

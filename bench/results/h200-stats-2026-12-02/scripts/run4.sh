#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
xz -dc .dev/s24/sa.xz > /tmp/sa; chmod +x /tmp/sa
S="bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages"
timeout 120 /tmp/sa $S --pipeline-stats > $OUT/sparse-stats.txt 2>&1; echo "rc=$?"
grep -E "sparse_coop|wgsl:|Register|error" $OUT/sparse-stats.txt | head -60
for t in 1,32 2,16; do
  SPARSE_ATTN_COOP_SPARSE=$t timeout 100 /tmp/sa $S --pipeline-stats > $OUT/sparse-t$t.txt 2>&1
  echo "== tile $t rc=$?"; grep -E "sparse_coop.wgsl" $OUT/sparse-t$t.txt | head; grep -A1 'sparse_coop.wgsl:fwd  ' $OUT/sparse-t$t.txt | head -4
done
timeout 150 /tmp/sa bench full --seq 8192 --head-dim 128 --heads 16 --mask causal --variant f16:coop,f16:xl,xl --target-seconds 0.2 --pipeline-stats > $OUT/full-stats.txt 2>&1; echo "full rc=$?"
grep -vE "^\s*$" $OUT/full-stats.txt | tail -30

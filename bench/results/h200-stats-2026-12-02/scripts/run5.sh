#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
xz -dc .dev/s24/sa.xz > /tmp/sa; chmod +x /tmp/sa
S="bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages --no-backward --pipeline-stats"
for r in 1 2; do for v in v5 qs nopf qsnopf; do
  SPARSE_ATTN_SHADERS=$PWD/.dev/s24/sh/$v timeout 100 /tmp/sa $S > $OUT/s-$v-$r.txt 2>&1
  echo "== $v $r rc=$?"; grep -E "sparse_coop.wgsl:fwd  " $OUT/s-$v-$r.txt | head -2; grep -A1 '^sparse_coop.wgsl:fwd' $OUT/s-$v-$r.txt | grep -o 'Register Count=[0-9]*\|Local Memory Size=[0-9]*'
done; done
for t in 2x16 4x16; do for v in qs qsnopf; do
  SPARSE_ATTN_COOP_SPARSE=${t/x/,} SPARSE_ATTN_SHADERS=$PWD/.dev/s24/sh/$v timeout 100 /tmp/sa $S > $OUT/s-$v-$t.txt 2>&1
  echo "== $v $t rc=$?"; grep -E "sparse_coop.wgsl:fwd  " $OUT/s-$v-$t.txt | head -2; grep -A1 '^sparse_coop.wgsl:fwd' $OUT/s-$v-$t.txt | grep -o 'Register Count=[0-9]*'
done; done

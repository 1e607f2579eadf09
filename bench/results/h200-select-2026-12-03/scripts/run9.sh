#!/usr/bin/env bash
# Session 26 (NOT RUN: the session had no device time left). Binaries built from the tree with
# variants/topk-row-4-winners.patch applied (release CLI as sa.xz, gpu-check suite as suite.xz,
# stripped, in .dev/s26). The subgroup top-k's row form with up to 4 winners per lane: the
# selection tests on the H200, then sort / row form / workgroup form at a few seq x k.
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s26
xz -T8 -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa; mkdir -p /tmp/gt; xz -T8 -dc $D/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
(cd /tmp/gt && SPARSE_ATTN_GPU_CHECK=1 timeout 60 ./suite --test-threads 1 --nocapture select:: 2>&1 | grep -E "^test |result|panicked|seed|subgroup sizes" > $OUT/check.txt); tail -1 $OUT/check.txt; grep -v " ok$" $OUT/check.txt | head
for sk in "16384 64" "16384 32" "16384 128" "8192 32" "8192 64" "4096 16" "4096 32"; do
  set -- $sk; seq=$1; k=$2
  S="--seq $seq --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk $k"
  for v in sort row wg; do
    case $v in sort) e="SPARSE_ATTN_TOPK=0";; row) e="SPARSE_ATTN_TOPK=1";; wg) e="SPARSE_ATTN_TOPK=1 SPARSE_ATTN_TOPK_ROWS=0";; esac
    env $e timeout 20 /tmp/sa bench sparse $S --dtype f16 --target-seconds 0.05 --stages --no-backward > $OUT/t.txt 2>&1
    echo "== seq $seq k $k $v rc=$? $(grep -E 'block_topk' $OUT/t.txt | head -1)"
    cat $OUT/t.txt >> $OUT/grid.txt
  done
done
rm -f $OUT/t.txt

#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s24
xz -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa; mkdir -p /tmp/gt; xz -dc $D/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
(cd /tmp/gt && SPARSE_ATTN_GPU_CHECK=1 timeout 150 ./suite --test-threads 1 sparse:: train_ops 2>&1 | grep -E "^test |result|panicked" > $OUT/gpu-check.txt); tail -1 $OUT/gpu-check.txt; grep -v " ok$" $OUT/gpu-check.txt | head
S="bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages --pipeline-stats"
for n in 4 2 1; do for v in old new; do
  if [ $v = old ]; then export SPARSE_ATTN_SHADERS=$D/sh/v5; else unset SPARSE_ATTN_SHADERS; fi
  SPARSE_ATTN_COOP_SPARSE_NPH=$n timeout 60 /tmp/sa $S > $OUT/dkdv-$v-nph$n.txt 2>&1
  echo "== $v nph $n rc=$?"; grep -E "dkdv_coop  |dq_coop  " $OUT/dkdv-$v-nph$n.txt | head -2
  grep -A1 '^sparse_coop_bwd.wgsl:dkdv' $OUT/dkdv-$v-nph$n.txt | grep -o 'NPH=[0-9]*\|Register Count=[0-9]*\|Local Memory Size=[0-9]*' | tr '\n' ' '; echo
done; done

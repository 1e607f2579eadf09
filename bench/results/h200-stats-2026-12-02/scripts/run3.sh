#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
xz -dc .dev/s24/sa.xz > /tmp/sa; chmod +x /tmp/sa
mkdir -p /tmp/gt; xz -dc .dev/s24/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
(cd /tmp/gt && RUSTC_BOOTSTRAP=1 SPARSE_ATTN_GPU_CHECK=1 timeout 300 ./suite --test-threads 1 --report-time -Zunstable-options coop automatic sparse:: 2>&1 | grep -E "^test |result|panicked" | head -40 | tee $OUT/gpu-check.txt)
S="bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages"
for r in 1 2; do for v in base v5 keep l1; do
  SPARSE_ATTN_SHADERS=$PWD/.dev/s24/sh/$v timeout 100 /tmp/sa $S > $OUT/sparse-$v-$r.txt 2>&1
  echo "== sparse $v $r rc=$?"; grep -E "sparse_coop" $OUT/sparse-$v-$r.txt | head -6
done; done

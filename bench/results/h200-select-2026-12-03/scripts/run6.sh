#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s25
xz -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa; mkdir -p /tmp/gt; xz -dc $D/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
(cd /tmp/gt && SPARSE_ATTN_GPU_CHECK=1 timeout 200 ./suite --test-threads 1 select:: decode:: offload:: train_ops 2>&1 | grep -E "^test |result|panicked|seed" > $OUT/check.txt); tail -1 $OUT/check.txt; grep -v " ok$" $OUT/check.txt | head
for S in "--seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16" "--seq 8192 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16" "--seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 64"; do
for r in 1 2; do for v in oldtopk lead built-in; do
  if [ $v = built-in ]; then unset SPARSE_ATTN_SHADERS; else export SPARSE_ATTN_SHADERS=$D/sh/$v; fi
  SPARSE_ATTN_TOPK=1 timeout 60 /tmp/sa bench sparse $S --dtype f16 --target-seconds 0.2 --stages --no-backward --pipeline-stats > $OUT/t.txt 2>&1
  echo "== $S | $v $r rc=$? $(grep -E 'block_topk_(row|sg)  ' $OUT/t.txt | head -1 | grep -o '[a-z_]*  *[0-9.]* ms') $(grep -A1 '^block_topk_sg.wgsl:block_topk_' $OUT/t.txt | grep -o 'Register Count=[0-9]*\|Local Memory Size=[0-9]*' | tr '\n' ' ')"
  cat $OUT/t.txt >> $OUT/topk-ab.txt
done; done; done
rm -f $OUT/t.txt

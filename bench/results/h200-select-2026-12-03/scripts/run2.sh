#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s25
xz -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa; mkdir -p /tmp/gt; xz -dc $D/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
(cd /tmp/gt && SPARSE_ATTN_GPU_CHECK=1 timeout 150 ./suite --test-threads 1 select:: train_ops 2>&1 | grep -E "^test |result|panicked|seed" > $OUT/check.txt); tail -1 $OUT/check.txt; grep -v " ok$" $OUT/check.txt | head
S="bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages --no-backward"
run() { # name shaders(or -) extra args
  local n=$1 v=$2; shift 2
  if [ "$v" = - ]; then unset SPARSE_ATTN_SHADERS; else export SPARSE_ATTN_SHADERS=$D/sh/$v; fi
  timeout 60 /tmp/sa $S "$@" > $OUT/$n.txt 2>&1
  echo "== $n rc=$? $(grep -E 'block_scores_coop  ' $OUT/$n.txt | head -1 | grep -o '[0-9.]* ms') $(grep -A1 '^block_scores_coop.wgsl' $OUT/$n.txt | grep -o 'Register Count=[0-9]*\|Local Memory Size=[0-9]*' | tr '\n' ' ')"
}
for r in 1 2; do
  run base$r base --pipeline-stats
  run new$r - --pipeline-stats
done

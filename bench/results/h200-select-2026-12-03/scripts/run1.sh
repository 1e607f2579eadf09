#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s25
xz -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa; mkdir -p /tmp/gt; xz -dc $D/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
true
S="bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages --no-backward"
run() { # name shaders [tile]
  local n=$1 v=$2 t=${3:-}
  if [ -n "$t" ]; then export SPARSE_ATTN_COOP_SCORES=$t; else unset SPARSE_ATTN_COOP_SCORES; fi
  SPARSE_ATTN_SHADERS=$D/sh/$v timeout 60 /tmp/sa $S ${4:-} > $OUT/$n.txt 2>&1
  echo "== $n rc=$? $(grep -E 'block_scores_coop  ' $OUT/$n.txt | head -1 | grep -o '[0-9.]* ms') $(grep -A1 '^block_scores_coop.wgsl' $OUT/$n.txt | grep -o 'Register Count=[0-9]*\|Local Memory Size=[0-9]*' | tr '\n' ' ')"
}
for r in 1 2; do
  run base-$r base "" --pipeline-stats
  run v1-$r v1 "" --pipeline-stats
  run nop1-$r nop1
  run nowr-$r nowr
  run l1-$r l1
  run p1only-$r p1only
  run sgonly-$r sgonly
done
run v1-4x32 v1 4,32 --pipeline-stats
run v1-4x64 v1 4,64 --pipeline-stats
run base-4x64 base 4,64 --pipeline-stats

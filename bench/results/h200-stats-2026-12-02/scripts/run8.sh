#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s24
xz -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa
S="bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages --no-backward --pipeline-stats"
for r in 1 2; do for v in built-in topk; do
  if [ $v = topk ]; then export SPARSE_ATTN_SHADERS=$D/sh/topk; else unset SPARSE_ATTN_SHADERS; fi
  timeout 60 /tmp/sa $S > $OUT/topk-$v-$r.txt 2>&1
  echo "== $v $r rc=$?"; grep -E "block_topk_row  |select ms" -A1 $OUT/topk-$v-$r.txt | grep -E 'topk_row|^4 ' | head -3
  grep -A1 '^block_topk_sg.wgsl:block_topk_row' $OUT/topk-$v-$r.txt | grep -o 'Register Count=[0-9]*\|Local Memory Size=[0-9]*' | tr '\n' ' '; echo
done; done

#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s25
xz -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/device.txt 2>&1
pip install --no-deps --target /tmp/site $D/whl/*.whl >/dev/null 2>&1
S="bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages --no-backward"
for r in 1 2; do for v in new built-in; do
  if [ $v = new ]; then export SPARSE_ATTN_SHADERS=$D/sh/new; else unset SPARSE_ATTN_SHADERS; fi
  timeout 60 /tmp/sa $S > $OUT/tail-$v-$r.txt 2>&1
  echo "== $v $r rc=$? $(grep -E 'block_scores_coop  ' $OUT/tail-$v-$r.txt | head -1 | grep -o '[0-9.]* ms')"
done; done
unset SPARSE_ATTN_SHADERS
mkdir -p $OUT/peers
start=$(date +%s)
PYTHONPATH=/tmp/site timeout 420 bash bench/peers.sh /tmp/sa $OUT/peers 8192,16384 128 > $OUT/peers/run.log 2>&1; echo "peers rc=$? $(( $(date +%s) - start )) s"
tail -25 $OUT/peers/run.log

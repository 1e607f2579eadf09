#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s25
mkdir -p /tmp/gt; xz -dc $D/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
xz -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
start=$(date +%s)
timeout 400 scripts/gpu-check.sh run /tmp/gt > $OUT/gpu-check.log 2>&1; rc=$?
echo "rc=$rc $(( $(date +%s) - start )) s" | tee -a $OUT/gpu-check.log
grep -E "^test result|gpu-check:" $OUT/gpu-check.log; grep -E "FAILED|panicked" $OUT/gpu-check.log | head -20
timeout 60 /tmp/sa bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages --pipeline-stats > $OUT/final-stages.txt 2>&1
grep -E "ms  \(" $OUT/final-stages.txt

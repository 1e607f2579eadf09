#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s25
mkdir -p /tmp/gt; xz -dc $D/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
start=$(date +%s)
timeout 580 scripts/gpu-check.sh run /tmp/gt > $OUT/gpu-check.log 2>&1; rc=$?
echo "rc=$rc $(( $(date +%s) - start )) s" | tee -a $OUT/gpu-check.log
grep -E "^test result|gpu-check:" $OUT/gpu-check.log; grep -E "FAILED|panicked|skipp" $OUT/gpu-check.log | head -20

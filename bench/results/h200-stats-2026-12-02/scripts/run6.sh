#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s24
xz -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa; mkdir -p /tmp/gt; xz -dc $D/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/device.txt 2>&1
(cd /tmp/gt && SPARSE_ATTN_GPU_CHECK=1 timeout 240 ./suite --test-threads 1 coop automatic sparse:: select:: llama decode:: 2>&1 | grep -E "^test |result|panicked" > $OUT/gpu-check.txt); tail -2 $OUT/gpu-check.txt; grep -v " ok$" $OUT/gpu-check.txt | head
pip install --no-deps --target /tmp/site $D/whl/*.whl >/dev/null 2>&1
mkdir -p $OUT/peers
PYTHONPATH=/tmp/site timeout 330 bash bench/peers.sh /tmp/sa $OUT/peers 8192,16384 128 2>&1 | tail -25

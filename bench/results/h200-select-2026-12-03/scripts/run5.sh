#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
D=$PWD/.dev/s25
xz -dc $D/sa.xz > /tmp/sa; chmod +x /tmp/sa; mkdir -p /tmp/gt; xz -dc $D/suite.xz > /tmp/gt/suite; chmod +x /tmp/gt/suite
pip install --no-deps --target /tmp/site $D/whl/*.whl >/dev/null 2>&1
(cd /tmp/gt && SPARSE_ATTN_GPU_CHECK=1 timeout 200 ./suite --test-threads 1 select:: decode:: offload:: train_ops 2>&1 | grep -E "^test |result|panicked|seed" > $OUT/check.txt); tail -1 $OUT/check.txt; grep -v " ok$" $OUT/check.txt | head
S="bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages --no-backward"
for r in 1 2; do for v in oldtopk built-in; do
  if [ $v = oldtopk ]; then export SPARSE_ATTN_SHADERS=$D/sh/oldtopk; else unset SPARSE_ATTN_SHADERS; fi
  timeout 60 /tmp/sa $S --pipeline-stats > $OUT/t.txt 2>&1
  echo "== $v $r rc=$? $(grep -E 'block_topk_row  ' $OUT/t.txt | head -1 | grep -o '[0-9.]* ms') $(grep -A1 '^block_topk_sg.wgsl:block_topk_row' $OUT/t.txt | grep -o 'Register Count=[0-9]*\|Local Memory Size=[0-9]*' | tr '\n' ' ')"
  cat $OUT/t.txt >> $OUT/topk-ab.txt
done; done
rm -f $OUT/t.txt; unset SPARSE_ATTN_SHADERS
mkdir -p $OUT/peers
start=$(date +%s)
PYTHONPATH=/tmp/site timeout 420 bash bench/peers.sh /tmp/sa $OUT/peers 8192,16384 128 > $OUT/peers-run.log 2>&1; echo "peers rc=$? $(( $(date +%s) - start )) s"
rm -f $OUT/peers/peers.err
tail -24 $OUT/peers-run.log

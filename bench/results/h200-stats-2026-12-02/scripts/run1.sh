#!/usr/bin/env bash
set -u
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
xz -dc .dev/s24/sa.xz > /tmp/sa; chmod +x /tmp/sa
S="bench sparse --seq 16384 --head-dim 128 --heads 16 --kv-heads 1 --block 16 --topk 16 --dtype f16 --target-seconds 0.2 --stages"
run() { # name shaderdir tile
  local n=$1 d=$2 t=${3:-}
  if [ -n "$t" ]; then export SPARSE_ATTN_COOP_SPARSE=$t; else unset SPARSE_ATTN_COOP_SPARSE; fi
  SPARSE_ATTN_SHADERS=$PWD/.dev/s24/sh/$d RUST_LOG=warn timeout 100 /tmp/sa $S > $OUT/$n.txt 2>&1
  echo "== $n ($d ${t:-default}) rc=$?"; grep -E "sparse_coop.wgsl:fwd|fwd" $OUT/$n.txt | head -3
}
for r in 1 2; do
for v in base nofetch noput nos nosm nopv kdir kvdir; do run $v-$r $v; done
done
run kdir-1x32 kdir 1,32
run kvdir-1x32 kvdir 1,32
run kvdir-1x64 kvdir 1,64
run kvdir-2x16 kvdir 2,16
run kvdir-4x16 kvdir 4,16

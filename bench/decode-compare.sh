#!/usr/bin/env bash
# Decoding before and after a kernel change, in one run on the same GPU (issue 17's goals,
# docs/BENCHMARKS.md "Decoding"): the batch x context grid of `bench decode` for each binary,
# then, with the newer one, GPU time by kernel at 32k and the offloaded modes by both host ->
# GPU paths.
#
#   bench/decode-compare.sh OLD_BIN NEW_BIN OUT_DIR [STEPS]
#
# OLD_BIN may be "-" to skip the baseline. Everything also goes to OUT_DIR/*.jsonl (one JSON
# record per command) and OUT_DIR/*.txt (the tables).
set -euo pipefail
old=$1
new=$2
out=$3
steps=${4:-16}
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
grid=(--batch 1,4,16 --context 4096,16384,32768 --layers 32 --steps "$steps")
run() {
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$out/README.txt"
    "$@" --json-out "$out/$name.jsonl" 2>"$out/$name.err" | tee "$out/$name.txt"
}
"$new" info > "$out/info.txt"
if [ "$old" != "-" ]; then
    run grid-old "$old" bench decode "${grid[@]}"
fi
# Builds before session 10 have no --bandwidth-gbs.
run grid-new "$new" bench decode "${grid[@]}" --bandwidth-gbs 4800
run stages-new "$new" bench decode --batch 1,16 --context 32768 --layers 32 --steps 8 \
    --bandwidth-gbs 4800 --stages
# The kernel-by-kernel times are printed on stderr.
cp "$out/stages-new.err" "$out/stages-new-kernels.txt"
for path in in-place staged; do
    run "offload-$path" "$new" bench decode --batch 1,16 --context 16384,32768 --layers 32 \
        --steps 8 --modes offload-infllm,offload-nosa --offload-path "$path"
done

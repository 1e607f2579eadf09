#!/usr/bin/env bash
# Checks every kernel variant against the reference on a real GPU, including the variants the CI
# machine (lavapipe) cannot run. Two steps, because the GPU machine has no crate registry:
#
#   scripts/gpu-check.sh build [DIR]   here: build the GPU test binaries into DIR (default .dev/gpu-tests)
#   scripts/gpu-check.sh run [DIR]     on the GPU machine: run them all; exits non-zero on a failure
#
# On a machine with both cargo and a GPU, `scripts/gpu-check.sh` alone does both.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-all}"
dir="${2:-.dev/gpu-tests}"

build() {
    mkdir -p "$dir"
    rm -f "$dir"/*
    # The integration tests are one binary (tests/suite.rs). Without the `cli` feature its CLI
    # module is left out: that one needs the cargo tree and runs in CI. With `train`, our
    # kernels inside Burn (train_ops: NOSA's biased attention and selection too) are in it.
    cargo test --locked --release --no-default-features --features train --no-run \
        --message-format=json --test suite 2>/dev/null \
        | python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        dst = os.path.join(sys.argv[1], m["target"]["name"])
        shutil.copy(m["executable"], dst)
        print("built", dst)
' "$dir"
}

run() {
    # On a device with cooperative matrices, a skipped tensor-core case fails its test
    # (tests/common: skip_coop), so a broken support check cannot pass here untested.
    # The training runs (train::) test Burn's stack and our modes, not a kernel variant: CI runs
    # them. One test at a time: the timings the tests print stay readable.
    export SPARSE_ATTN_GPU_CHECK=1
    local failed=0
    for t in "$dir"/*; do
        echo "== $t"
        if ! "$t" --test-threads=1 --nocapture --skip train:: 2>&1 | grep -v XDG_RUNTIME_DIR; then
            failed=1
        fi
        [ "${PIPESTATUS[0]}" = 0 ] || failed=1
    done
    [ "$failed" = 0 ] && echo "gpu-check: all variants passed" || { echo "gpu-check: FAILURES"; exit 1; }
}

case "$mode" in
    build) build ;;
    run) run ;;
    all) build && run ;;
    *) echo "usage: $0 [build|run|all] [DIR]" >&2; exit 2 ;;
esac

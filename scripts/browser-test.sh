#!/usr/bin/env bash
# The browser test CI runs: build the site, serve it on 127.0.0.1, drive Debian's Chromium
# headless with WebGPU on SwiftShader through the page (tests/browser/demo.test.mjs), compare
# what the page computed with the native library, and keep screenshots in
# target/browser-artifacts/ (demo.png, no-webgpu.png).
# Installs what it needs when missing: chromium and the node packages (scripts/browser-deps.sh),
# and what scripts/web-build.sh installs. The native side needs a Vulkan driver (scripts/test.sh
# installs lavapipe).
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
# (.ci/run installs them in the background and says so with BROWSER_DEPS_DONE=1.)
[ "${BROWSER_DEPS_DONE:-}" = 1 ] || bash scripts/browser-deps.sh
bash scripts/web-build.sh web/dist
# The native side: SPARSE_ATTN_BIN when given (CI passes the CLI its test build made), else a
# release build of the CLI (no training stack).
bin="${SPARSE_ATTN_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --locked --release --bin sparse-attn
    bin=target/release/sparse-attn
fi
[ -x "$bin" ] || { echo "no CLI binary at $bin" >&2; exit 1; }
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory web/dist >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
    sleep 0.2
done
node tests/browser/demo.test.mjs "http://127.0.0.1:$port/" "$bin" target/browser-artifacts

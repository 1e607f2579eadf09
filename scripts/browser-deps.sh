#!/usr/bin/env bash
# What the browser test needs besides the Rust toolchain, installed when missing: Debian's
# chromium (apt) and the node packages of tests/browser (npm ci). scripts/browser-test.sh runs
# it; .ci/run starts it in the background at the beginning, so the downloads overlap the build.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    # Without its recommends (udev, upower, the printer tools and what they pull in: systemd
    # upgrades, avahi, samba's libraries, GTK's Python): the headless browser needs none of them.
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends chromium
fi
command -v node >/dev/null || { echo "node >= 20 (for playwright-core) is needed for the browser test" >&2; exit 1; }
(cd tests/browser && npm ci --no-audit --no-fund --silent)

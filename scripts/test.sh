#!/usr/bin/env bash
# The project's test command: makes sure a Vulkan device exists (installs Mesa's lavapipe, the
# software Vulkan driver, when none does and apt is usable), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

have_vulkan_icd() {
    # (ls fails when one of the globs matches nothing: only its output counts.)
    { ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json \
        /usr/local/share/vulkan/icd.d/*.json 2>/dev/null || true; } | grep -q . \
        || [ -n "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ]
}

if [ "$(uname -s)" = Linux ] && ! have_vulkan_icd; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        echo "No Vulkan driver found: installing Mesa's lavapipe (mesa-vulkan-drivers)."
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
    else
        echo "No Vulkan driver found and apt-get is unavailable; install a Vulkan driver." >&2
    fi
fi

# Headless machines: Mesa's window-system probing wants a runtime dir (else it prints noise).
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
# The training stack (feature `train`) is off by default for a quick first build; the tests
# cover it.
exec cargo test --locked --features train "$@"

#!/usr/bin/env bash
# Makes sure a Vulkan device exists: installs Mesa's lavapipe (the software Vulkan driver) when
# no Vulkan driver is installed and apt is usable. Used by scripts/test.sh and .ci/run.
set -euo pipefail

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

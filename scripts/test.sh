#!/usr/bin/env bash
# The project's test command: makes sure a Vulkan device exists (installs Mesa's lavapipe, the
# software Vulkan driver, when none does and apt is usable), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-lavapipe.sh

# Headless machines: Mesa's window-system probing wants a runtime dir (else it prints noise).
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
# The training stack (feature `train`) is off by default for a quick first build; the tests
# cover it.
exec cargo test --locked --features train "$@"

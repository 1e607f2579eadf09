#!/usr/bin/env bash
# The project's test command: makes sure a Vulkan device exists (installs Mesa's lavapipe, the
# software Vulkan driver, when none does and apt is usable), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-lavapipe.sh

# Headless machines: Mesa's window-system probing wants a runtime dir (else it prints noise).
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
# On lavapipe most of a cold run is LLVM compiling each kernel variant at its first dispatch:
# without LLVM's optimisation passes the suite took 1263 s instead of 1421 (2 cores, empty Mesa
# shader cache, 130 passed both ways; docs/ARCHITECTURE.md). Only llvmpipe/lavapipe read it.
export GALLIVM_PERF="${GALLIVM_PERF-nopt}"
# The training stack (feature `train`) is off by default for a quick first build; the tests
# cover it.
exec cargo test --locked --features train "$@"

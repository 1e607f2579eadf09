#!/usr/bin/env bash
# Build the browser demo into one folder (default web/dist): the wasm module made from web/
# (the library and its WGSL kernels, wgpu's WebGPU backend) plus the static page.
#   scripts/web-build.sh [OUT_DIR]
# Installs what it needs when missing: rustup's wasm32 target and wasm-bindgen-cli at exactly
# the version of the wasm-bindgen crate in Cargo.lock (the two must match).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-web/dist}"
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if ! wasm-bindgen --version 2>/dev/null | grep -qx "wasm-bindgen $version"; then
    echo "installing wasm-bindgen-cli $version (matches Cargo.lock)"
    # Not through a clippy wrapper CI may have set: it is not our code. Unoptimised (--debug):
    # the install takes 91 s instead of 203 (CPU 169 s against 390, 2 cores) and the tool 2.5 s
    # instead of 0.5 on the demo's module, with the same output byte for byte.
    env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS cargo install --debug wasm-bindgen-cli --version "$version"
fi
cargo build --locked --release --target wasm32-unknown-unknown -p sparse-attn-web
rm -rf "$out"
mkdir -p "$out"
wasm-bindgen --target web --no-typescript --out-dir "$out/pkg" \
    target/wasm32-unknown-unknown/release/sparse_attn_web.wasm
cp web/index.html web/app.js web/style.css "$out/"
echo "site in $out ($(du -sh "$out" | cut -f1)); serve it with scripts/web-serve.sh"

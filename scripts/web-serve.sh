#!/usr/bin/env bash
# Serve the built demo (scripts/web-build.sh) on http://127.0.0.1:PORT (default 8080).
#   scripts/web-serve.sh [PORT] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-8080}"
dir="${2:-web/dist}"
[ -f "$dir/index.html" ] || { echo "no site in $dir: run scripts/web-build.sh first" >&2; exit 1; }
echo "serving $dir on http://127.0.0.1:$port/ (Ctrl-C stops)"
exec python3 -m http.server "$port" --bind 127.0.0.1 --directory "$dir"

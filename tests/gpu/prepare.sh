#!/bin/bash
# Copies what the GPU checks read from ../shared into .gpu/shared (git-ignored), so that the
# device machine, which gets only this repository, has it, and unpacks this machine's packages of
# the C libraries the build needs into .gpu/deps, for an image without them (tests/gpu/deps.sh).
# Name ".gpu" in the run's `carry`.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/../.."
SHARED=${1:-$(cd .. && pwd)/shared}
rm -rf .gpu/shared
mkdir -p .gpu/shared
cp -r "$SHARED/fixtures" "$SHARED/tools" "$SHARED/hub" .gpu/shared/
rm -rf .gpu/debs .gpu/deps
mkdir -p .gpu/debs .gpu/deps
(cd .gpu/debs && apt-get download -q libjansson4 libjansson-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 \
  libpcre2-dev libpng16-16 libpng-dev libjpeg62-turbo libjpeg62-turbo-dev zlib1g-dev 2>&1 | grep -v "unsandboxed") || true
for f in .gpu/debs/*.deb; do dpkg -x "$f" .gpu/deps; done
rm -rf .gpu/debs .gpu/deps/usr/share/doc .gpu/deps/usr/share/man
find .gpu/deps -name '*.a' -delete
du -sh .gpu

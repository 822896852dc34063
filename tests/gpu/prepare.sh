#!/bin/bash
# Copies what the GPU checks read from ../shared into .gpu/shared (git-ignored), so that the
# device machine, which gets only this repository, has it. Name ".gpu" in the run's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${1:-$(cd .. && pwd)/shared}
rm -rf .gpu/shared
mkdir -p .gpu/shared
cp -r "$SHARED/fixtures" "$SHARED/tools" "$SHARED/hub" .gpu/shared/
du -sh .gpu

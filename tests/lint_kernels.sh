#!/bin/bash
# The launch rule of kernels/cuda (internal.cuh): every kernel is launched through launch(), with
# programmatic dependent launch, so every kernel must wait (pdl_entry or pdl_wait) before it
# touches activations. A kernel that forgets races with its predecessor on a GPU only; the CPU
# emulator runs launches one after another and cannot see it. So this checks the source:
#   - no triple-chevron launch is left in kernels/cuda (it would bypass launch());
#   - every __global__ function's body calls pdl_entry() or pdl_wait().
#   lint_kernels.sh SOURCE_DIR
set -u
src=${1:?usage: lint_kernels.sh SOURCE_DIR}/kernels/cuda
fail=0
if grep -n '<<<' "$src"/*.cu "$src"/*.cuh; then
  echo "lint_kernels: launch through launch() (internal.cuh), not a triple-chevron launch"
  fail=1
fi
for f in "$src"/*.cu; do
  # A kernel's body: from its __global__ line to the next line that is a lone "}" at column 0.
  out=$(awk -v file="$f" '
    /__global__/ { inside = 1; name = $0; waited = 0; next }
    inside && /pdl_(entry|wait)\(\)/ { waited = 1 }
    inside && /^}/ { if (!waited) printf "%s: a kernel without pdl_entry()/pdl_wait(): %s\n", file, name; inside = 0 }
  ' "$f")
  if [ -n "$out" ]; then
    echo "$out"
    fail=1
  fi
done
kernels=$(grep -c '__global__' "$src"/*.cu | awk -F: '{ n += $2 } END { print n }')
[ "$fail" -eq 0 ] && echo "lint_kernels: $kernels kernels, each waits before it reads; no triple-chevron launch"
exit "$fail"

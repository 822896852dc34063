# Shared helpers of the shell tests: counters, a temp dir removed at exit, and the image-token
# prefix of the model's input ids. Source it after setting nothing; call summary at the end.
pass=0
fail=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*" >&2; }
image_ids() { local s="" i; for ((i = 0; i < $1; i++)); do s+="50265,"; done; echo "${s}2"; }
# A run in which no check passed fails too: a step that silently did nothing must not read as green.
summary() {
  echo "$pass passed, $fail failed"
  [ "$pass" -gt 0 ] || echo "FAIL: no check ran" >&2
  [ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]
}

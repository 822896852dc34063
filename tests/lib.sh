# Shared helpers of the shell tests: counters, a temp dir removed at exit, and the image-token
# prefix of the model's input ids. Source it after setting nothing; call summary at the end.
pass=0
fail=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*" >&2; }
image_ids() { local s="" i; for ((i = 0; i < $1; i++)); do s+="50265,"; done; echo "${s}2"; }
summary() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; }

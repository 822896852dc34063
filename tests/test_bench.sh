#!/bin/bash
# blip2-bench against a real server: `mpirun -np 2 blip2d` on the tiny fixture, a ~10 s streaming
# closed-loop run at concurrency 4; the JSON must have the summary and per-request fields, every
# request sent must have succeeded (and there must be some), the plot must be a PNG; then a short
# --unique-images run must miss the server's image cache every time, and bench/plot.sh must redraw
# the PNG from the JSON.
#   tests/test_bench.sh BLIP2D BLIP2_BENCH SHARED_DIR [MPIRUN]
set -u
BLIP2D=$1
BENCH=$2
SHARED=$3
MPIRUN=${4:-mpirun}
HERE=$(cd "$(dirname "$0")" && pwd)
FIX=$SHARED/fixtures
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3

pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*" >&2; }
finish() {
  echo "$pass passed, $fail failed"
  [ "$fail" -eq 0 ]
  exit $?
}

tmp=$(mktemp -d)
server_pid=""
stop_server() {
  [ -n "$server_pid" ] || return 0
  kill -TERM "$server_pid" 2>/dev/null
  local i
  for ((i = 0; i < 100; i++)); do # up to 20 s: the server lets in-flight requests finish
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "$server_pid" 2>/dev/null
  wait "$server_pid" 2>/dev/null
  server_pid=""
}
cleanup() {
  stop_server
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# ---- the server
"$MPIRUN" -np 2 "$BLIP2D" --model "$FIX/tiny-f16" --listen 127.0.0.1:0 --port-file "$tmp/port" \
  >"$tmp/server.log" 2>&1 </dev/null &
server_pid=$!
for ((i = 0; i < 600; i++)); do # up to 60 s
  [ -s "$tmp/port" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -s "$tmp/port" ]; then ok; else
  bad "blip2d wrote no port file within 60 s: $(tail -20 "$tmp/server.log")"
  finish
fi
addr=127.0.0.1:$(tr -d ' \n' <"$tmp/port")

# ---- the ~10 s run
timeout 300 "$BENCH" --server "$addr" --wait-ready 120 --duration 10 --concurrency 4 --stream \
  --images "$FIX/images" --max-new-tokens 8 --json-out "$tmp/run.json" --plot "$tmp/run.png" \
  >"$tmp/bench.out" 2>"$tmp/bench.err"
rc=$?
if [ $rc -eq 0 ]; then ok; else bad "blip2-bench exited $rc: $(cat "$tmp/bench.out" "$tmp/bench.err" | tail -30)"; fi
if grep -q "requests/s" "$tmp/bench.out" && grep -q "TTFT" "$tmp/bench.out"; then ok; else
  bad "no report table on stdout: $(cat "$tmp/bench.out")"; fi

# The JSON: fields, counts, every request OK.
if "$PY" - "$tmp/run.json" >"$tmp/check.out" 2>&1 <<'EOF'; then ok; else bad "JSON check: $(cat "$tmp/check.out")"; fi
import json, sys
d = json.load(open(sys.argv[1]))
problems = []
def need(obj, keys, where):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            problems.append("%s: no %r" % (where, k))
need(d, ["tool", "config", "servers", "warmup", "summary", "runs"], "top level")
s = d["summary"]
need(s, ["mode", "concurrency", "stream", "elapsed_s", "requests_sent", "requests_ok", "requests_failed", "errors",
         "requests_per_s", "generated_tokens", "generated_tokens_per_s", "e2e_ms", "ttft_ms", "tpot_ms",
         "server_ms_mean", "image_cache", "per_server"], "summary")
for k in ["e2e_ms", "ttft_ms", "tpot_ms"]:
    need(s.get(k), ["n", "mean", "min", "p50", "p90", "p99", "max"], "summary." + k)
if len(d["runs"]) != 1:
    problems.append("%d runs, expected 1" % len(d["runs"]))
reqs = d["runs"][0]["requests"]
if s["requests_sent"] <= 0:
    problems.append("no request was sent")
if s["requests_ok"] != s["requests_sent"] or s["requests_failed"] != 0 or s["errors"]:
    problems.append("sent %s, ok %s, failed %s, errors %s" % (s["requests_sent"], s["requests_ok"],
                                                             s["requests_failed"], s["errors"]))
if len(reqs) != s["requests_sent"]:
    problems.append("%d request records for %d sent" % (len(reqs), s["requests_sent"]))
for r in reqs:
    need(r, ["start_ms", "e2e_ms", "ttft_ms", "tpot_ms", "generated_tokens", "status", "queue_ms", "image_ms",
             "prefill_ms", "decode_ms", "image_cached"], "request %s" % r.get("index"))
    if r.get("status") != "OK" or not r.get("generated_tokens") or r.get("ttft_ms") is None \
            or not (0 <= r["ttft_ms"] <= r["e2e_ms"]):
        problems.append("request %s: %s" % (r.get("index"), r))
        break
if s["elapsed_s"] < 9 or s["elapsed_s"] > 60:
    problems.append("elapsed %s s for --duration 10" % s["elapsed_s"])
if s["requests_per_s"] <= 0 or s["generated_tokens_per_s"] <= 0 or s["ttft_ms"]["p50"] <= 0:
    problems.append("rates: %s req/s, %s tok/s, ttft p50 %s" % (s["requests_per_s"], s["generated_tokens_per_s"],
                                                               s["ttft_ms"]["p50"]))
if s["concurrency"] != 4 or s["stream"] is not True:
    problems.append("concurrency %s, stream %s" % (s["concurrency"], s["stream"]))
c = s["image_cache"]
if c is None or c["hits"] + c["misses"] != s["requests_sent"] or c["hits"] <= 0:
    problems.append("image cache (5 images, cycled): %s" % c)
if d["servers"][0].get("tp_degree") != 2:
    problems.append("servers: %s" % d["servers"])
if problems:
    print("\n".join(problems[:20]))
    sys.exit(1)
print("ok: %d requests" % s["requests_sent"])
EOF

png_ok() { [ "$(head -c 8 "$1" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ]; }
if png_ok "$tmp/run.png"; then ok; else bad "--plot wrote no PNG: $(ls -la "$tmp")"; fi

# ---- every image made unique: no cache hits
timeout 120 "$BENCH" --server "$addr" --requests 6 --concurrency 2 --unique-images --max-new-tokens 2 \
  --images "$FIX/images" --json-out "$tmp/unique.json" >"$tmp/u.out" 2>&1
rc=$?
if [ $rc -eq 0 ] && "$PY" -c '
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
c = s["image_cache"]
sys.exit(0 if s["requests_ok"] == 6 and c and c["hits"] == 0 and c["misses"] == 6 else 1)' "$tmp/unique.json"; then ok; else
  bad "--unique-images: rc $rc $(cat "$tmp/u.out")"; fi

# ---- the plot script redraws from the JSON
if bash "$HERE/../bench/plot.sh" "$tmp/run.json" "$tmp/replot.png" >"$tmp/plot.out" 2>&1 && png_ok "$tmp/replot.png"; then ok; else
  bad "bench/plot.sh: $(cat "$tmp/plot.out")"; fi

stop_server
finish

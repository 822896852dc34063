#!/bin/bash
# Draws (again) the picture blip2-bench --plot draws, from its --json-out file:
#   bench/plot.sh RESULT.json OUT.png [TITLE]
# left: throughput (requests/s) vs p99 end-to-end latency, one point per run (a --sweep gives a
# curve); right: the CDF of the time to first token per run (of the end-to-end latency when the
# run was not --stream). Use it to restyle or re-title a result (TITLE) without measuring again.
# Needs gnuplot (Debian gnuplot-nox) and python3.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 RESULT.json OUT.png [TITLE]" >&2
  exit 2
fi
JSON=$1
PNG=$2
TITLE=${3:-}
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3
command -v gnuplot >/dev/null || { echo "$0: gnuplot is not installed (apt-get install gnuplot-nox)" >&2; exit 1; }

script=$("$PY" - "$JSON" "$PNG" "$TITLE" <<'EOF'
import json, sys

path, png, title = sys.argv[1], sys.argv[2], sys.argv[3]
with open(path) as f:
    d = json.load(f)
runs = d.get("runs") or []
cfg = d.get("config") or {}
stream = bool(cfg.get("stream"))

def q(s):  # a gnuplot single-quoted string
    return "'" + str(s).replace("'", "''").replace("\n", " ") + "'"

if not title:
    servers = cfg.get("servers") or []
    title = "blip2-bench: %d server%s, %s, max_new_tokens %s" % (
        len(servers), "" if len(servers) == 1 else "s", "GenerateStream" if stream else "Generate",
        cfg.get("max_new_tokens") or "server default")

out = []
out.append("if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
           "  set terminal pngcairo noenhanced size 1400,560 font ',10'\n"
           "} else {\n  set terminal png noenhanced size 1400,560\n}")
out.append("set output " + q(png))
out.append("set multiplot layout 1,2 title " + q(title))
out.append("set grid")

points = []
for r in runs:
    s = r.get("summary") or {}
    e2e = s.get("e2e_ms")
    if e2e and e2e.get("p99") is not None:
        points.append((e2e["p99"], s.get("requests_per_s") or 0, s.get("label", "")))
out.append("$runs << EOD")
for p99, rps, label in points:
    out.append('%.6f %.6f "%s"' % (p99, rps, label.replace('"', "'")))
out.append("EOD")
out.append("set title 'Throughput vs p99 end-to-end latency'\nset xlabel 'p99 end-to-end latency (ms)'\n"
           "set ylabel 'requests/s'\nset xrange [0:*]\nset yrange [0:*]\n"
           "set offsets 0, graph 0.15, graph 0.15, 0\nset key top left")
if points:
    out.append("plot $runs using 1:2 with linespoints pt 7 ps 1.5 lw 2 title 'one point per run', "
               "$runs using 1:2:3 with labels offset 0,1.2 notitle")
else:
    out.append("set xrange [0:1]\nset yrange [0:1]\nset label 1 'no successful requests' at graph 0.5,0.5 center\n"
               "plot 2 notitle\nunset label 1")

key = "ttft_ms" if stream else "e2e_ms"
out.append("set offsets 0, 0, 0, 0")
curves = []
for k, r in enumerate(runs):
    v = sorted(x[key] for x in r.get("requests") or []
               if x.get("status") == "OK" and x.get(key) is not None)
    if not v:
        continue
    n = len(v)
    step = max(1, -(-n // 2000))
    out.append("$cdf%d << EOD" % k)
    out.append("0 0")
    for i in range(0, n, step):
        out.append("%.6f %.6f" % (v[i], (i + 1) / n))
    if (n - 1) % step:
        out.append("%.6f 1" % v[-1])
    out.append("EOD")
    curves.append("$cdf%d using 1:2 with steps lw 2 title %s" % (k, q((r.get("summary") or {}).get("label", k))))
if stream:
    out.append("set title 'Time to first token (CDF)'\nset xlabel 'TTFT (ms)'")
else:
    out.append("set title 'End-to-end latency (CDF; TTFT needs --stream)'\nset xlabel 'end-to-end latency (ms)'")
out.append("set ylabel 'fraction of requests'\nset xrange [0:*]\nset yrange [0:1.05]\nset key bottom right")
if curves:
    out.append("plot " + ", ".join(curves))
else:
    out.append("set xrange [0:1]\nset label 1 'no data' at graph 0.5,0.5 center\nplot 2 notitle")
out.append("unset multiplot\nset output")
print("\n".join(out))
EOF
)
rm -f "$PNG"
printf '%s\n' "$script" | gnuplot
if [ "$(head -c 8 "$PNG" 2>/dev/null | od -An -tx1 | tr -d ' \n')" != "89504e470d0a1a0a" ]; then
  echo "$0: gnuplot did not write a PNG to $PNG" >&2
  exit 1
fi
echo "wrote $PNG"

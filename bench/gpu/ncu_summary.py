"""Where a step's time goes, kernel by kernel, from `ncu --metrics gpu__time_duration.sum --csv
--page raw` (bench/gpu/run.sh). The random-weight fills are dropped; the rest is cut into segments
after each k_argmax_rows (the end of a prefill or decode step), or with --start-at NAME before each
NAME kernel (k_im2col: the start of an image encoder run). Prints the total of every segment and,
for the segment picked (default: the last complete one, a decode step), the kernels grouped by
name and grid, largest first. ncu serialises kernels and flushes caches between them, so its
times are upper bounds (small kernels most); the proportions are what to read.

    python3 ncu_summary.py FILE.csv [--segment N] [--top K] [--start-at NAME]
"""
import argparse
import collections
import csv
import re

ap = argparse.ArgumentParser()
ap.add_argument("csv")
ap.add_argument("--segment", type=int, default=None, help="segment to break down (default: the last complete one)")
ap.add_argument("--top", type=int, default=25)
ap.add_argument("--start-at", default=None, help="cut before each kernel of this name instead of after each argmax")
a = ap.parse_args()

with open(a.csv) as f:
    lines = [line for line in f if line.startswith('"')]
rows = csv.reader(lines)
head, units = next(rows), next(rows)
ti, ni, gi = head.index("gpu__time_duration.sum"), head.index("Kernel Name"), head.index("Grid Size")
scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "nsecond": 1e-3, "ms": 1e3}.get(units[ti], 1e-3)
kernels = []
for r in rows:
    name = re.sub(r"\(.*", "", r[ni]).replace("<unnamed>::", "").replace("void ", "")[:64]
    if name != "k_fill_normal":
        kernels.append((name, r[gi], float(r[ti].replace(",", "")) * scale))

segments, cur = [], []
for k in kernels:
    if a.start_at and k[0] == a.start_at:
        if cur and cur[0][0] == a.start_at:  # a segment is complete once the next one starts
            segments.append(cur)
        cur = []
    cur.append(k)
    if not a.start_at and k[0] == "k_argmax_rows":
        segments.append(cur)
        cur = []
print(f"{len(kernels)} kernels profiled; {len(segments)} complete segments (+{len(cur)} kernels after the last)")
for i, s in enumerate(segments):
    print(f"  segment {i}: {len(s):5d} kernels {sum(k[2] for k in s):10.1f} us")
pick = segments[a.segment] if a.segment is not None else (segments[-1] if segments else cur)
total = sum(k[2] for k in pick)
print(f"\nbreakdown of {'segment %d' % a.segment if a.segment is not None else 'the last segment'}: "
      f"{len(pick)} kernels, {total:.1f} us")
agg = collections.defaultdict(lambda: [0, 0.0])
for name, grid, t in pick:
    agg[(name, grid)][0] += 1
    agg[(name, grid)][1] += t
for (name, grid), (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[: a.top]:
    print(f"{t:10.1f} us {100 * t / total:5.1f}% {n:5d}x {t / n:8.2f} us  {name} grid {grid}")

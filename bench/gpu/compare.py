#!/usr/bin/env python3
"""The `blip2 bench --json` outputs of one bench/gpu/run.sh call side by side: each step (ours,
ours_fa, ours_gemvwarp, ...) a row, vision ms, decode ms a step, one request's ms and engine
requests/s columns, and for each column the step's ratio to the base step where both have it
(below 1 for ms: faster). The base is BASE, else `ours`, else `ours_ab`. Steps that are not our
bench's JSON (HF, ncu, op tables) are left out.
    python3 bench/gpu/compare.py DIR [BASE]    # DIR: the extracted gpu.tgz (or .gpu/out)
"""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and ("text" in d or "images" in d or "engine" in d) else None


def columns(d):
    """{column name: value} of one bench JSON; lower is better for ms, higher for req/s."""
    cols = {}
    for row in d.get("images", []):
        cols[f"vision@{row['batch']} ms"] = row["ms"]
    for row in d.get("text", []):
        cols[f"decode@{row['batch']} ms"] = row["decode_ms_per_step"]
    if "request_16_tokens_ms" in d:
        cols["request16 ms"] = d["request_16_tokens_ms"]
    for row in d.get("engine", []):
        cols[f"engine@{row['batch']} req/s"] = row["requests_per_s"]
    return cols


def column_order(c):
    """vision, decode, request, engine; within each by batch size."""
    kind, _, rest = c.partition("@")
    return (["vision", "decode", "request16 ms", "engine"].index(kind), int(rest.split()[0]) if rest else 0)


def bench_steps(root):
    """{step name: columns} of every bench JSON (*.out) under root."""
    steps = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".out"):
            d = load(os.path.join(root, name))
            if d:
                steps[name[:-4]] = columns(d)
    return steps


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else ".gpu/out"
    steps = bench_steps(root)
    if not steps:
        print(f"no bench JSON (*.out) under {root}")
        return 1
    order = sorted({c for cols in steps.values() for c in cols}, key=column_order)
    base_name = sys.argv[2] if len(sys.argv) > 2 else "ours" if "ours" in steps else "ours_ab"
    base = steps.get(base_name, {})
    names = sorted(steps, key=lambda n: (n != base_name, n))
    width = max(len(n) for n in names)
    for c in order:
        print(f"\n{c}")
        for n in names:
            v = steps[n].get(c)
            if v is None:
                continue
            ratio = f"  {v / base[c]:.3f}x {base_name}" if n != base_name and base.get(c) else ""
            print(f"  {n:<{width}}  {v:>10.3f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

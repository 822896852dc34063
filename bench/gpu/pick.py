#!/usr/bin/env python3
"""Chooses, from one bench/gpu/run.sh call's same-run comparisons, the switches that win, so that
the same call can time the published table (ours, ours_256, ...) with them (BLIP2_GPU_PICK=1).

Each group below is a set of alternatives to the defaults for one part of the work (the encoders'
attention, the one-row GEMV, the paged attention at batch 32-64); each alternative is a bench step
run with some BLIP2_* variables set, timed on the columns it is for. An alternative qualifies when
  - the test steps it needs passed in this call (tests/gpu/run.sh's gpu_summary.txt: a kernel that
    was not checked on the card is never picked) and none of its guards failed;
  - every one of its columns is at most 1.02x the base's (ours_ab, else ours) and their geometric
    mean at most 0.99x: a gain of 1 % over all of them, not a trade.
The best qualifying alternative of a group (lowest mean) is picked. Writes picked.env (VAR=value
lines, nothing when the defaults stay) and picks.txt (what was decided and why) into DIR.
    python3 bench/gpu/pick.py DIR
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (same folder)

GAIN, WORST = 0.99, 1.02


class Alt:
    def __init__(self, step, env, columns, needs=(), guards=()):
        self.step, self.env, self.columns, self.needs, self.guards = step, env, columns, needs, guards


GROUPS = [
    ("encoder attention", [
        Alt("ours_fa", {"BLIP2_QKV16": "1", "BLIP2_ATTN_FA": "1"}, ["vision@1 ms", "vision@64 ms"],
            needs=["ops_fa", "parity_f16_fa"]),
        Alt("ours_qkv16", {"BLIP2_QKV16": "1"}, ["vision@1 ms", "vision@64 ms"], needs=["ops", "parity_f16"]),
    ]),
    ("one-row GEMV", [
        Alt("ours_gemvwarp", {"BLIP2_GEMV_WARP": "1"}, ["decode@1 ms"], needs=["ops_gemv_warp"]),
        Alt("ours_fusedln_off", {"BLIP2_FUSED_LN": "0"}, ["decode@1 ms"]),
        Alt("ours_lnrows1", {"BLIP2_GEMV_LN_ROWS": "1"}, ["decode@1 ms"], guards=["ops"]),
        Alt("ours_lnrows2", {"BLIP2_GEMV_LN_ROWS": "2"}, ["decode@1 ms"], guards=["ops"]),
    ]),
    ("paged attention at batch 32-64", [
        Alt("ours_online512", {"BLIP2_PAGED_ONLINE_MIN": "512"}, ["decode@32 ms", "decode@64 ms"],
            guards=["ops", "ops_paged_online"]),
    ]),
]


def test_results(root):
    """{step: 'PASS' | 'FAIL' | 'SKIP'} from gpu_summary.txt (empty when there is none)."""
    res = {}
    try:
        with open(os.path.join(root, "gpu_summary.txt")) as f:
            for line in f:
                word, _, rest = line.partition(" ")
                if word in ("PASS", "FAIL", "SKIP") and rest:
                    res[rest.split()[0].rstrip(":")] = word
    except OSError:
        pass
    return res


def judge(alt, steps, base, tests):
    """(mean ratio, text): mean None when alt does not qualify."""
    for t in alt.needs:
        if tests.get(t) != "PASS":
            return None, f"not checked on the card ({t}: {tests.get(t, 'did not run')})"
    for t in alt.guards:
        if tests.get(t) == "FAIL":
            return None, f"{t} failed"
    cols = steps.get(alt.step)
    if cols is None:
        return None, "did not run"
    ratios = {}
    for c in alt.columns:
        if c not in cols or not base.get(c):
            return None, f"no {c} in both it and the base"
        ratios[c] = cols[c] / base[c]
    mean = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
    text = ", ".join(f"{c} {r:.3f}x" for c, r in ratios.items())
    if mean > GAIN or max(ratios.values()) > WORST:
        return None, f"{text}: not a gain"
    return mean, text


def pick(root):
    steps, tests = compare.bench_steps(root), test_results(root)
    base_name = "ours_ab" if "ours_ab" in steps else "ours"
    base = steps.get(base_name, {})
    env, lines = {}, [f"base: {base_name}" + ("" if base else " (missing: nothing picked)")]
    for group, alts in GROUPS:
        best = None
        lines.append(f"{group}:")
        for alt in alts:
            mean, text = judge(alt, steps, base, tests) if base else (None, "no base")
            lines.append(f"  {alt.step} ({' '.join(f'{k}={v}' for k, v in alt.env.items())}): {text}")
            if mean is not None and (best is None or mean < best[0]):
                best = (mean, alt)
        if best:
            env.update(best[1].env)
            lines.append(f"  -> {best[1].step}")
        else:
            lines.append("  -> the defaults")
    return env, lines


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else ".gpu/out"
    env, lines = pick(root)
    with open(os.path.join(root, "picked.env"), "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in env.items())
    with open(os.path.join(root, "picks.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("picked:", " ".join(f"{k}={v}" for k, v in env.items()) or "nothing (the defaults)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""bench/gpu/pick.py's decisions on made-up results of one device call: a faster switch whose
kernel passed its checks on the card is picked; one that failed them, did not run them, is slower
on any column, or gains under 1 % is not; within a group the fastest qualifying one wins; and the
picked.env that bench/gpu/run.sh reads holds exactly the winners' variables.
    python3 tests/test_bench_pick.py REPO_ROOT
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
PICK = os.path.join(ROOT, "bench", "gpu", "pick.py")
failures = 0


def bench(vision=None, decode=None):
    d = {"device": "cuda"}
    if vision:
        d["images"] = [{"batch": b, "ms": ms} for b, ms in vision.items()]
    if decode:
        d["text"] = [{"batch": b, "decode_ms_per_step": ms} for b, ms in decode.items()]
    return d


BASE = bench({1: 4.6, 64: 100.0}, {1: 2.8, 32: 3.3, 64: 3.7})


def run(steps, summary):
    with tempfile.TemporaryDirectory() as d:
        for name, data in steps.items():
            with open(os.path.join(d, name + ".out"), "w") as f:
                json.dump(data, f)
        with open(os.path.join(d, "gpu_summary.txt"), "w") as f:
            f.write(summary)
        p = subprocess.run([sys.executable, PICK, d], capture_output=True, text=True)
        with open(os.path.join(d, "picked.env")) as f:
            env = dict(line.strip().split("=", 1) for line in f if line.strip())
        return env, p.stdout + p.stderr


def check(what, steps, summary, want):
    global failures
    env, out = run(steps, summary)
    if env != want:
        failures += 1
        print(f"FAIL {what}: picked {env}, want {want}\n{out}")
    else:
        print(f"ok   {what}: {env or 'the defaults'}")


PASSED = "PASS ops (20 s): 7225 checks\nPASS parity_f16 (9 s): ok\nPASS ops_fa (8 s): ok\n" \
         "PASS parity_f16_fa (9 s): ok\nPASS ops_gemv_warp (7 s): ok\n"
FA = {"BLIP2_QKV16": "1", "BLIP2_ATTN_FA": "1"}

check("FA faster on both columns", {"ours_ab": BASE, "ours_fa": bench({1: 3.0, 64: 80.0})}, PASSED, FA)
check("FA's parity failed", {"ours_ab": BASE, "ours_fa": bench({1: 3.0, 64: 80.0})},
      PASSED.replace("PASS parity_f16_fa (9 s): ok", "FAIL parity_f16_fa (9 s, rc 1):"), {})
check("FA not checked on the card", {"ours_ab": BASE, "ours_fa": bench({1: 3.0, 64: 80.0})},
      "PASS ops (20 s): ok\n", {})
check("FA faster at 64, 3 % slower at 1", {"ours_ab": BASE, "ours_fa": bench({1: 4.74, 64: 80.0})}, PASSED, {})
check("FA 0.5 % faster: noise", {"ours_ab": BASE, "ours_fa": bench({1: 4.58, 64: 99.5})}, PASSED, {})
check("qkv16 and FA both faster: FA's the larger gain",
      {"ours_ab": BASE, "ours_fa": bench({1: 3.0, 64: 80.0}), "ours_qkv16": bench({1: 4.0, 64: 95.0})}, PASSED, FA)
check("qkv16 alone faster", {"ours_ab": BASE, "ours_fa": bench({1: 5.0, 64: 101.0}),
                             "ours_qkv16": bench({1: 4.0, 64: 95.0})}, PASSED, {"BLIP2_QKV16": "1"})
check("GEMV group: the fastest of four",
      {"ours_ab": BASE, "ours_gemvwarp": bench(decode={1: 2.5}), "ours_fusedln_off": bench(decode={1: 2.7}),
       "ours_lnrows1": bench(decode={1: 2.4}), "ours_lnrows2": bench(decode={1: 2.6})},
      PASSED, {"BLIP2_GEMV_LN_ROWS": "1"})
check("online512 faster at 32 and 64, with every group",
      {"ours_ab": BASE, "ours_online512": bench(decode={32: 3.1, 64: 3.4}), "ours_fa": bench({1: 3.0, 64: 80.0}),
       "ours_gemvwarp": bench(decode={1: 2.3})},
      PASSED, {**FA, "BLIP2_GEMV_WARP": "1", "BLIP2_PAGED_ONLINE_MIN": "512"})
check("online512 with a failed ops step", {"ours_ab": BASE, "ours_online512": bench(decode={32: 3.1, 64: 3.4})},
      PASSED + "FAIL ops_paged_online (3 s, rc 1):\n", {})
check("no base: nothing", {"ours_fa": bench({1: 3.0, 64: 80.0})}, PASSED, {})
check("ours as the base when there is no ours_ab", {"ours": BASE, "ours_gemvwarp": bench(decode={1: 2.3})},
      PASSED, {"BLIP2_GEMV_WARP": "1"})


# bench/gpu/run.sh with BLIP2_GPU_PICK=1 on this machine, its `blip2` replaced by a script that
# prints a bench JSON whose times depend on the switches it was started with (no GPU here): the
# switch steps must run first, their winner be picked, and the later steps get it.
FAKE_BLIP2 = r"""#!/bin/bash
v1=4.6 v64=100 d1=2.8
[ "${BLIP2_ATTN_FA:-}" = 1 ] && v1=3.0 v64=80
[ "${BLIP2_GEMV_WARP:-}" = 1 ] && d1=2.9
echo "{\"device\": \"cuda\", \"fa\": \"${BLIP2_ATTN_FA:-0}\", \"images\": [{\"batch\": 1, \"ms\": $v1},
 {\"batch\": 64, \"ms\": $v64}], \"text\": [{\"batch\": 1, \"decode_ms_per_step\": $d1}]}"
"""


def check_run_sh():
    global failures
    with tempfile.TemporaryDirectory() as d:
        build, out = os.path.join(d, "build"), os.path.join(d, "out")
        os.makedirs(build)
        os.makedirs(out)
        with open(os.path.join(build, "blip2"), "w") as f:
            f.write(FAKE_BLIP2)
        os.chmod(os.path.join(build, "blip2"), 0o755)
        with open(os.path.join(out, "gpu_summary.txt"), "w") as f:
            f.write(PASSED)
        env = dict(os.environ, BUILD=build, OUT=out, SHARED=d, BLIP2_GPU_PICK="1",
                   BLIP2_GPU_ONLY="ours ours_ab ours_fa ours_gemvwarp ours_256")
        p = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu", "run.sh")], env=env, capture_output=True,
                           text=True, timeout=120)
        log = p.stdout + p.stderr
        order = [line.split(":")[0] for line in p.stdout.splitlines() if ": rc " in line]
        try:
            with open(os.path.join(out, "ours.out")) as f:
                ours = json.load(f)
            with open(os.path.join(out, "ours_ab.out")) as f:
                ours_ab = json.load(f)
        except (OSError, ValueError) as e:
            ours = ours_ab = {"error": str(e)}
        ok = (order[:3] == ["ours_ab", "ours_gemvwarp", "ours_fa"] and order[3:] == ["ours", "ours_256"] and
              ours.get("fa") == "1" and ours_ab.get("fa") == "0" and
              os.path.exists(os.path.join(out, "compare_ab.txt")) and "BLIP2_ATTN_FA=1" in log)
        if not ok:
            failures += 1
            print(f"FAIL run.sh with BLIP2_GPU_PICK=1: steps {order}, ours {ours}\n{log}")
        else:
            print(f"ok   run.sh with BLIP2_GPU_PICK=1: steps {order}, ours timed with BLIP2_ATTN_FA=1")


check_run_sh()
sys.exit(1 if failures else 0)

#!/usr/bin/python3
"""Soak: N requests at concurrency C against a running blip2d, mixed with cancellations, short
deadlines and malformed requests. Checks: zero wrong answers, every request ends with exactly one
final status of the kind its mix expects, the server's resident memory after the run within 5 %
of its value after warm-up, no KV block in use and no extra file descriptors at the end.

    soak.py --addr HOST:PORT --proto-dir DIR --shared DIR --refs REFS.json --pids PID[,PID...]
            [--requests 10000] [--concurrency 64] [--json-out FILE]
PIDS: the server's ranks (their VmRSS and open fds are read from /proc). Prints "N passed, M failed"."""
import argparse
import json
import os
import sys
import threading
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import server_client as sc  # noqa: E402  (stubs, channel, Api, wait_idle)

KINDS = ["ok"] * 14 + ["stream_ok", "stream_cancel", "deadline", "garbage", "empty_image", "bad_param"]


def rss_kb(pids):
    total = 0
    for p in pids:
        for line in open("/proc/%d/status" % p):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def fds(pids):
    return sum(len(os.listdir("/proc/%d/fd" % p)) for p in pids)


def one(api, kind, case, img, prompt, ref):
    """Runs one request of a kind; returns (final status name, wrong answer?)."""
    b = sc.P["b"]
    req = b.GenerateRequest(image=img, prompt=prompt, max_new_tokens=12)
    try:
        if kind == "ok":
            r = api.generate(req, timeout=300)
            return "OK", list(r.token_ids) != ref
        if kind == "stream_ok":
            ids, finals = [], 0
            for m in api.stream(req, timeout=300):
                ids.extend(m.token_ids)
                finals += m.final
            return "OK", ids != ref or finals != 1
        if kind == "stream_cancel":
            it = api.stream(b.GenerateRequest(image=img, prompt=prompt, max_new_tokens=500), timeout=300)
            next(it)
            it.cancel()
            for _ in it:
                pass
            return "OK", True  # the stream must not go on after cancel
        if kind == "deadline":
            api.generate(b.GenerateRequest(image=img, prompt=prompt, max_new_tokens=1000), timeout=0.002)
            return "OK", False
        if kind == "garbage":
            api.raw_generate(b"\xff\x00garbage" * 7, timeout=60)
            return "OK", True
        if kind == "empty_image":
            api.generate(b.GenerateRequest(image=b"", prompt=prompt), timeout=60)
            return "OK", True
        if kind == "bad_param":
            api.generate(b.GenerateRequest(image=img, prompt=prompt, max_new_tokens=10 ** 9), timeout=60)
            return "OK", True
    except grpc.RpcError as e:
        return e.code().name, False
    return "NONE", True


EXPECT = {"ok": {"OK"}, "stream_ok": {"OK"}, "stream_cancel": {"CANCELLED"}, "deadline": {"DEADLINE_EXCEEDED", "OK"},
          "garbage": {"INVALID_ARGUMENT"}, "empty_image": {"INVALID_ARGUMENT"}, "bad_param": {"INVALID_ARGUMENT"}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--shared", required=True)
    ap.add_argument("--refs", required=True)
    ap.add_argument("--pids", required=True)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=0, help="default: max(1000, requests / 2)")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--no-memory-check", action="store_true", help="sanitizer builds: RSS is not meaningful")
    a = ap.parse_args()
    a.warmup = a.warmup or max(1000, a.requests // 2) # RSS settles (allocator arenas, gRPC pools) first
    sc.load_stubs(a.proto_dir)
    pids = [int(p) for p in a.pids.split(",")]
    fx = os.path.join(a.shared, "fixtures")
    cases = json.load(open(os.path.join(fx, "MANIFEST.json")))["fixtures"]["tiny-f16"]["cases"]
    refs = {int(k): v for k, v in json.load(open(a.refs)).items()}
    images = [open(os.path.join(fx, c["image"]), "rb").read() for c in cases]
    apis = [sc.Api(sc.channel(a.addr)) for _ in range(a.concurrency)]

    def run(total, stats):
        lock, nxt = threading.Lock(), [0]

        def worker(w):
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= total:
                    return
                kind, n = KINDS[i % len(KINDS)], (i // len(KINDS)) % len(cases)
                status, wrong = one(apis[w], kind, n, images[n], cases[n]["prompt"], refs[n])
                with lock:
                    key = kind + ":" + status
                    stats["by_kind_status"][key] = stats["by_kind_status"].get(key, 0) + 1
                    stats["wrong"] += wrong
                    stats["unexpected"] += status not in EXPECT[kind]
                    stats["done"] += 1

        ts = [threading.Thread(target=worker, args=(w,)) for w in range(a.concurrency)]
        t0 = time.time()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        stats["seconds"] = time.time() - t0

    warm = {"by_kind_status": {}, "wrong": 0, "unexpected": 0, "done": 0}
    run(a.warmup, warm)
    sc.wait_idle(apis[0], 60)
    rss0, fd0 = rss_kb(pids), fds(pids)
    st = {"by_kind_status": {}, "wrong": 0, "unexpected": 0, "done": 0}
    run(a.requests, st)
    info = sc.wait_idle(apis[0], 120)
    time.sleep(0.5)
    rss1, fd1 = rss_kb(pids), fds(pids)
    st.update({"requests": a.requests, "concurrency": a.concurrency, "rss_after_warmup_kb": rss0, "rss_after_kb": rss1,
               "rss_growth": (rss1 - rss0) / rss0, "fds_after_warmup": fd0, "fds_after": fd1,
               "kv_blocks_in_use": info.kv_blocks_in_use if info else -1,
               "requests_per_s": a.requests / st["seconds"]})
    print(json.dumps(st, indent=1, sort_keys=True), flush=True)
    if a.json_out:
        json.dump(st, open(a.json_out, "w"), indent=1, sort_keys=True)
    sc.ok(st["done"] == a.requests, "every request ended: %d of %d" % (st["done"], a.requests))
    sc.ok(st["wrong"] == 0, "%d wrong answers" % st["wrong"])
    sc.ok(st["unexpected"] == 0, "%d unexpected statuses: %s" % (st["unexpected"], st["by_kind_status"]))
    sc.ok(info is not None and info.kv_blocks_in_use == 0, "KV blocks in use at the end: %s" % (info and info.kv_blocks_in_use))
    # within 5 % of the warm-up value: growth is what a leak looks like; the allocator giving pages
    # back (the run ending below the warm-up value) is not
    sc.ok(a.no_memory_check or rss1 - rss0 <= 0.05 * rss0, "resident memory %d kB after warm-up, %d kB after" % (rss0, rss1))
    sc.ok(fd1 <= fd0, "open files: %d after warm-up, %d after" % (fd0, fd1))
    print("%d passed, %d failed" % (sc.PASS[0], sc.FAIL[0]), flush=True)
    sys.exit(1 if sc.FAIL[0] else 0)


if __name__ == "__main__":
    main()

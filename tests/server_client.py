#!/usr/bin/python3
"""An independent blip2d client: Python grpcio (Debian's python3-grpcio), message classes generated
at run time with `protoc --python_out` from proto/*.proto, generic unary_unary / unary_stream calls.

    server_client.py --addr HOST:PORT --proto-dir DIR --shared DIR --refs REFS.json CMD ...

Commands:
    wait-serving SECONDS      poll Health/Check until SERVING (exit 1 on timeout)
    wait-active N SECONDS [READY_FILE]
                              poll ModelInfo until active + queued >= N (READY_FILE is created
                              once polling works: start the requests after it appears)
    checks NP                 the battery of checks (NP = expected tensor-parallel degree)

REFS.json maps a fixture case number to the token ids `blip2 generate` gave for it. Prints
"N passed, M failed" and exits non-zero on failure (checks)."""
import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import grpc

P = {}  # generated modules: blip2_pb2, health_pb2
PASS = [0]
FAIL = [0]


def ok(cond, what):
    if cond:
        PASS[0] += 1
    else:
        FAIL[0] += 1
        print("FAIL: " + what, file=sys.stderr, flush=True)
    return cond


def load_stubs(proto_dir):
    out = tempfile.mkdtemp(prefix="blip2py-")
    subprocess.run(["protoc", "-I" + proto_dir, "--python_out=" + out,
                    os.path.join(proto_dir, "blip2.proto"), os.path.join(proto_dir, "health.proto")], check=True)
    sys.path.insert(0, out)
    P["b"] = importlib.import_module("blip2_pb2")
    P["h"] = importlib.import_module("health_pb2")


def channel(addr):
    return grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20),
                                                ("grpc.max_send_message_length", 64 << 20),
                                                ("grpc.enable_retries", 0)])


class Api:
    def __init__(self, ch):
        b, h = P["b"], P["h"]
        self.ch = ch
        self.generate = ch.unary_unary("/blip2.v1.Blip2/Generate", request_serializer=b.GenerateRequest.SerializeToString,
                                       response_deserializer=b.GenerateReply.FromString)
        self.stream = ch.unary_stream("/blip2.v1.Blip2/GenerateStream",
                                      request_serializer=b.GenerateRequest.SerializeToString,
                                      response_deserializer=b.GenerateStreamReply.FromString)
        self.batch = ch.unary_unary("/blip2.v1.Blip2/GenerateBatch",
                                    request_serializer=b.GenerateBatchRequest.SerializeToString,
                                    response_deserializer=b.GenerateBatchReply.FromString)
        self.info = ch.unary_unary("/blip2.v1.Blip2/ModelInfo", request_serializer=b.ModelInfoRequest.SerializeToString,
                                   response_deserializer=b.ModelInfoReply.FromString)
        self.health = ch.unary_unary("/grpc.health.v1.Health/Check",
                                     request_serializer=h.HealthCheckRequest.SerializeToString,
                                     response_deserializer=h.HealthCheckResponse.FromString)
        self.raw_generate = ch.unary_unary("/blip2.v1.Blip2/Generate")  # bytes in, bytes out
        self.raw_batch = ch.unary_unary("/blip2.v1.Blip2/GenerateBatch")


def code_of(fn):
    """Runs fn(); returns (StatusCode, details, result)."""
    try:
        return grpc.StatusCode.OK, "", fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


def wait_serving(api, seconds):
    end = time.time() + seconds
    while time.time() < end:
        code, _, r = code_of(lambda: api.health(P["h"].HealthCheckRequest(), timeout=2))
        if code == grpc.StatusCode.OK and r.status == P["h"].HealthCheckResponse.SERVING:
            return True
        time.sleep(0.1)
    return False


def wait_idle(api, seconds):
    end = time.time() + seconds
    info = None
    while time.time() < end:
        code, _, info = code_of(lambda: api.info(P["b"].ModelInfoRequest(), timeout=2))
        if code == grpc.StatusCode.OK and info.active == 0 and info.queued == 0:
            return info
        time.sleep(0.05)
    return None


def request(img, prompt, n=12, **kw):
    b = P["b"]
    return b.GenerateRequest(image=img, prompt=prompt, max_new_tokens=n, **kw)


def checks(args, api):
    b, h = P["b"], P["h"]
    fx = os.path.join(args.shared, "fixtures")
    manifest = json.load(open(os.path.join(fx, "MANIFEST.json")))["fixtures"]["tiny-f16"]["cases"]
    refs = {int(k): v for k, v in json.load(open(args.refs)).items()}
    images = {c["case"]: open(os.path.join(fx, c["image"]), "rb").read() for c in manifest}
    chelsea = images[0]

    # Health
    r = api.health(h.HealthCheckRequest(), timeout=5)
    ok(r.status == h.HealthCheckResponse.SERVING, "health: %s" % r)
    r = api.health(h.HealthCheckRequest(service="blip2.v1.Blip2"), timeout=5)
    ok(r.status == h.HealthCheckResponse.SERVING, "health blip2.v1.Blip2: %s" % r)
    code, _, _ = code_of(lambda: api.health(h.HealthCheckRequest(service="nope"), timeout=5))
    ok(code == grpc.StatusCode.NOT_FOUND, "health unknown service: %s" % code)

    # ModelInfo
    info = api.info(b.ModelInfoRequest(), timeout=5)
    ok(info.tp_degree == args.np and info.num_query_tokens == 32 and info.vocab_size == 50304 and info.eos_token_id == 50118
       and info.default_max_new_tokens == 20 and info.dtype == "F16" and info.kv_blocks_total > 0,
       "model info: %s" % info)

    # Every fixture case: unary ids = blip2 generate = the golden greedy ids; stream = unary.
    texts = {}
    for c in manifest:
        n = c["case"]
        rep = api.generate(request(images[n], c["prompt"], request_id="py-case-%d" % n), timeout=60)
        ok(list(rep.token_ids) == refs[n], "case %d unary ids %s != blip2 generate %s" % (n, list(rep.token_ids), refs[n]))
        ok(list(rep.token_ids) == c["greedy_ids_no_eos_stop"], "case %d unary ids != golden" % n)
        ok(rep.finish_reason == b.FINISH_REASON_LENGTH and rep.usage.generated_tokens == 12
           and rep.usage.prompt_tokens == len(c["input_ids"]) and rep.request_id == "py-case-%d" % n,
           "case %d reply fields: %s" % (n, rep))
        texts[n] = rep.text
        pieces, ids, final = [], [], None
        for m in api.stream(request(images[n], c["prompt"]), timeout=60):
            if m.final:
                final = m
            else:
                pieces.append(m.text)
            ids.extend(m.token_ids)
        ok(final is not None and ids == refs[n], "case %d stream ids %s" % (n, ids))
        ok(final is not None and final.full_text == rep.text and "".join(pieces).strip() == rep.text
           and final.finish_reason == b.FINISH_REASON_LENGTH and final.usage.generated_tokens == 12,
           "case %d stream text %r / %r vs unary %r" % (n, "".join(pieces), final and final.full_text, rep.text))

    # Several prompts for one image: answers in order, the later ones reuse the image.
    rep = api.generate(b.GenerateRequest(image=images[1], max_new_tokens=12,
                                         prompts=[manifest[1]["prompt"], manifest[0]["prompt"]]), timeout=60)
    ok(len(rep.answers) == 2 and list(rep.answers[0].token_ids) == refs[1] and list(rep.token_ids) == refs[1]
       and rep.answers[1].text != "" and len(rep.answers[1].token_ids) == 12,
       "prompts: %s" % rep)

    # GenerateBatch: in order, with a per-item error.
    items = [request(images[n], manifest[n]["prompt"]) for n in (3, 0)] + [request(b"", "x")] + \
            [request(images[2], manifest[2]["prompt"])]
    rep = api.batch(b.GenerateBatchRequest(requests=items), timeout=60)
    ok(len(rep.items) == 4 and rep.items[0].code == 0 and list(rep.items[0].reply.token_ids) == refs[3]
       and rep.items[1].code == 0 and list(rep.items[1].reply.token_ids) == refs[0]
       and rep.items[2].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "image" in rep.items[2].message
       and rep.items[3].code == 0 and list(rep.items[3].reply.token_ids) == refs[2], "batch: %s" % rep)

    # Beam search (num_beams 3, as transformers' generate_beam3_raw).
    c = manifest[0]
    want = c["generate_beam3_raw"][len(c["input_ids"]):]
    rep = api.generate(request(chelsea, c["prompt"], decoding=b.DecodingParams(num_beams=3)), timeout=60)
    ok(list(rep.token_ids) == want, "beam3 %s != %s" % (list(rep.token_ids), want))

    # Sampling with a seed is repeatable.
    dec = b.DecodingParams(do_sample=True, top_k=5, temperature=0.7, seed=7, has_seed=True)
    r1 = api.generate(request(chelsea, "", decoding=dec), timeout=60)
    r2 = api.generate(request(chelsea, "", decoding=dec), timeout=60)
    ok(list(r1.token_ids) == list(r2.token_ids) and len(r1.token_ids) == 12, "seeded sampling %s %s" % (r1, r2))

    # Errors: each the documented status, and the server keeps serving.
    def status(fn, want, what, text=None):
        code, details, _ = code_of(fn)
        ok(code == want and (text is None or text in details), "%s: got %s %r, want %s" % (what, code, details, want))

    status(lambda: api.raw_generate(b"\xff\xff\xff\xff\x0f garbage", timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "garbage")
    jpg = open(os.path.join(fx, "inputs", "images", "chelsea_q90.jpg"), "rb").read()
    status(lambda: api.generate(request(jpg[:len(jpg) // 3], "hi"), timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
           "truncated JPEG")
    status(lambda: api.generate(request(chelsea[:1000], "hi"), timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
           "truncated PNG")
    status(lambda: api.generate(request(b"", "hi"), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "0-byte image", "image")
    status(lambda: api.generate(request(b"not an image at all", "hi"), timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
           "not an image")
    status(lambda: api.generate(request(os.urandom(40 << 20), "hi"), timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED,
           "40 MiB message")
    # wrong field types: image (1) as a varint; max_new_tokens (3) as bytes; decoding (4) as a fixed64
    status(lambda: api.raw_generate(b"\x08\x01", timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "image as varint")
    status(lambda: api.raw_generate(b"\x0a\x02ab\x1a\x01A", timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
           "max_new_tokens as bytes")
    status(lambda: api.raw_generate(b"\x0a\x02ab\x21" + b"\x00" * 8, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
           "decoding as fixed64")
    status(lambda: api.raw_batch(b"\x0a\x03\xff\xff\xff", timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "batch garbage")
    # a prompt that is not UTF-8 (protobuf-c does not check it; the server does)
    raw = request(chelsea, "").SerializeToString() + b"\x12\x03a\xff\xfe"
    status(lambda: api.raw_generate(raw, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "non-UTF-8 prompt", "UTF-8")
    status(lambda: api.generate(request(chelsea, "hi", n=10 ** 9), timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
           "max_new_tokens 1e9", "max_new_tokens")
    status(lambda: api.generate(request(chelsea, "hi", decoding=b.DecodingParams(num_beams=99)), timeout=10),
           grpc.StatusCode.INVALID_ARGUMENT, "num_beams 99", "num_beams")
    status(lambda: api.generate(request(chelsea, "hi", decoding=b.DecodingParams(do_sample=True, top_p=2.0)), timeout=10),
           grpc.StatusCode.INVALID_ARGUMENT, "top_p 2", "top_p")
    status(lambda: api.generate(request(chelsea, "word " * 3000), timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
           "prompt too long")
    status(lambda: api.ch.unary_unary("/blip2.v1.Blip2/Nope")(b"", timeout=10), grpc.StatusCode.UNIMPLEMENTED,
           "unknown method")
    status(lambda: api.ch.unary_unary("/other.Service/Method")(b"\x01\x02", timeout=10), grpc.StatusCode.UNIMPLEMENTED,
           "unknown service")
    rep = api.generate(request(chelsea, manifest[0]["prompt"], n=0), timeout=60)
    ok(len(rep.token_ids) == 20 and list(rep.token_ids[:12]) == refs[0] and rep.finish_reason == b.FINISH_REASON_LENGTH,
       "max_new_tokens 0 → model default 20: %s" % list(rep.token_ids))
    rep = api.generate(request(chelsea, manifest[0]["prompt"]), timeout=60)
    ok(list(rep.token_ids) == refs[0], "normal request after the errors")

    # Deadline shorter than the work: DEADLINE_EXCEEDED, the work stops, the server keeps serving.
    status(lambda: api.generate(request(chelsea, "hi", n=1000), timeout=0.005), grpc.StatusCode.DEADLINE_EXCEEDED,
           "5 ms deadline")
    status(lambda: api.generate(request(images[1], "hi", n=1000), timeout=0.2), grpc.StatusCode.DEADLINE_EXCEEDED,
           "200 ms deadline")
    ok(wait_idle(api, 10) is not None, "idle after the deadlines")
    rep = api.generate(request(chelsea, manifest[0]["prompt"]), timeout=60)
    ok(list(rep.token_ids) == refs[0], "normal request after the deadlines")

    # A client cancelling a stream stops the generation.
    before = api.info(b.ModelInfoRequest(), timeout=5)
    call = api.stream(request(chelsea, "Question: what? Answer:", n=1000, request_id="cancel-me"), timeout=120)
    got = 0
    for m in call:
        got += 1
        if got == 3:
            call.cancel()
            break
    t0 = time.time()
    after = wait_idle(api, 10)
    ok(after is not None and after.requests_failed == before.requests_failed + 1,
       "cancelled stream: active back to 0 after %.2f s (%s)" % (time.time() - t0, after))
    rep = api.generate(request(chelsea, manifest[0]["prompt"]), timeout=60)
    ok(list(rep.token_ids) == refs[0], "normal request after the cancel")

    # 32 concurrent clients, each on its own channel, each gets its own case's answer.
    results = [None] * 32

    def one(i):
        n = i % len(manifest)
        ch = channel(args.addr)
        try:
            r = Api(ch).generate(request(images[n], manifest[n]["prompt"], request_id="conc-%d" % i), timeout=120)
            results[i] = (n, list(r.token_ids), r.request_id)
        except grpc.RpcError as e:
            results[i] = (n, e.code(), e.details())
        finally:
            ch.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    bad = [(i, r) for i, r in enumerate(results) if r is None or r[1] != refs[r[0]] or r[2] != "conc-%d" % i]
    ok(not bad, "32 concurrent clients: %s" % bad[:3])
    print("32 concurrent clients: %.2f s" % (time.time() - t0), flush=True)
    ok(wait_idle(api, 10) is not None, "idle at the end")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--shared", default="")
    ap.add_argument("--refs", default="")
    ap.add_argument("cmd")
    ap.add_argument("rest", nargs="*")
    args = ap.parse_args()
    load_stubs(args.proto_dir)
    ch = channel(args.addr)
    api = Api(ch)
    if args.cmd == "wait-serving":
        sys.exit(0 if wait_serving(api, float(args.rest[0])) else 1)
    if args.cmd == "wait-active":
        want, end = int(args.rest[0]), time.time() + float(args.rest[1])
        ready = args.rest[2] if len(args.rest) > 2 else None
        while time.time() < end:
            code, _, info = code_of(lambda: api.info(P["b"].ModelInfoRequest(), timeout=2))
            if code == grpc.StatusCode.OK and ready:  # polling from now on: the caller may start its requests
                open(ready, "w").close()
                ready = None
            if code == grpc.StatusCode.OK and info.active + info.queued >= want:
                sys.exit(0)
            time.sleep(0.01)
        sys.exit(1)
    if args.cmd == "checks":
        args.np = int(args.rest[0])
        try:
            checks(args, api)
        except Exception as e:  # a crash is a failure, not a hang
            import traceback
            traceback.print_exc()
            ok(False, "exception: %r" % e)
        print("python client: %d passed, %d failed" % (PASS[0], FAIL[0]), flush=True)
        sys.exit(1 if FAIL[0] else 0)
    sys.exit("unknown command " + args.cmd)


if __name__ == "__main__":
    main()

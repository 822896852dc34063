/* The emulator's CUDA runtime (tests/cudasim/README.md): the cuda* functions kernels/cuda calls,
 * with the real prototypes of cuda_runtime_api.h, on the CPU. What it models, because that is
 * where host code around kernels goes wrong:
 *  - Streams are queues. Work runs when the host waits for it (cudaStreamSynchronize, an event,
 *    a copy into pageable memory, cudaFree), not when it is queued, so host code that reads a
 *    result or reuses a pinned buffer before waiting sees what it would see on a GPU.
 *  - Device memory: every allocation has guard zones (checked at cudaFree and at every wait) and
 *    starts as 0xff bytes (NaN as floats). Copies, kernels and cuBLAS check that their pointers
 *    are device memory where they must be.
 *  - Graph capture records the stream's work (launch arguments by value) and replays it; calls a
 *    capture forbids (a wait, an allocation, a copy from pageable memory) fail and invalidate it.
 *  - A failing kernel (stuck barrier, bad pointer) is a sticky error, as a fault is on a GPU.
 *  - Programmatic dependent launch: a kernel launched with it right after another kernel has its
 *    first block run up to its griddepcontrol.wait before that kernel, on a thread of its own
 *    (run_overlapped), so what it reads or writes before the wait races as on a GPU. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "fiber.h"
#include "sim.h"

/* A grid of ours as queued: what run_grid needs. */
struct blip2_sim_grid {
    const char *kernel; /* the string literal of the launch: outlives any replay */
    const void *fn;     /* the kernel function */
    dim3 grid, block;
    size_t smem;
    std::function<void()> body;
};
/* One piece of a stream's work: a copy, a set, a graph, a cuBLAS call or a grid of ours. */
struct blip2_sim_work {
    std::function<void()> run;
    bool kernel = false;                 /* a kernel (ours or cuBLAS's): a PDL launch after it overlaps it */
    std::shared_ptr<blip2_sim_grid> pdl; /* a grid of ours launched with programmatic dependent launch */
};
typedef std::vector<blip2_sim_work> blip2_sim_tape;

struct CUstream_st {
    std::mutex mu; /* held while queueing or running this stream's work */
    std::deque<blip2_sim_work> queue;
    bool capturing = false, capture_broken = false;
    std::shared_ptr<blip2_sim_tape> tape;
};
struct CUevent_st {
    cudaStream_t stream = nullptr; /* the stream of its last record */
};
struct CUgraph_st {
    std::shared_ptr<blip2_sim_tape> tape;
};
struct CUgraphExec_st {
    std::shared_ptr<blip2_sim_tape> tape;
};

namespace blip2_sim {
namespace {

constexpr size_t GUARD = 256; /* bytes before and after each allocation; keeps 256-byte alignment */
constexpr unsigned char GUARD_BYTE = 0xa5;
constexpr int SMEM_DEFAULT = 48 * 1024, SMEM_OPTIN = 227 * 1024;

thread_local cudaError_t tl_last = cudaSuccess;
thread_local cudaStream_t tl_capture = nullptr; /* the stream this thread captures, if any */
std::atomic<int> g_sticky{cudaSuccess};

struct alloc_info {
    size_t bytes;
    bool pinned;
};
std::mutex g_mem_mu;
std::map<uintptr_t, alloc_info> g_allocs; /* user pointer -> size */
std::mutex g_streams_mu;
std::set<cudaStream_t> g_streams;
CUstream_st g_default_stream;
std::mutex g_func_mu;
std::map<const void *, int> g_func_smem; /* cudaFuncAttributeMaxDynamicSharedMemorySize per kernel */

cudaError_t ret(cudaError_t e) {
    if (e != cudaSuccess) tl_last = e;
    return e;
}

void sticky(cudaError_t e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sticky(cudaError_t e, const char *fmt, ...) {
    int expect = cudaSuccess;
    g_sticky.compare_exchange_strong(expect, (int)e);
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cudasim: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

cudaStream_t resolve(cudaStream_t s) {
    if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread || s == &g_default_stream)
        return &g_default_stream;
    std::lock_guard<std::mutex> g(g_streams_mu);
    return g_streams.count(s) ? s : nullptr;
}

/* ---- memory ---- */
void *mem_new(size_t bytes, bool pinned) {
    unsigned char *base = (unsigned char *)aligned_alloc(GUARD, GUARD * 2 + ((bytes + GUARD - 1) / GUARD) * GUARD);
    if (!base) return nullptr;
    memset(base, GUARD_BYTE, GUARD);
    memset(base + GUARD, 0xff, bytes);
    memset(base + GUARD + bytes, GUARD_BYTE, GUARD);
    std::lock_guard<std::mutex> g(g_mem_mu);
    g_allocs[(uintptr_t)(base + GUARD)] = alloc_info{bytes, pinned};
    return base + GUARD;
}

bool guards_ok(uintptr_t p, const alloc_info &a) {
    const unsigned char *u = (const unsigned char *)p;
    for (size_t i = 0; i < GUARD; i++)
        if (u[-(ptrdiff_t)GUARD + (ptrdiff_t)i] != GUARD_BYTE || u[a.bytes + i] != GUARD_BYTE) return false;
    return true;
}

void guards_check_all(const char *where) {
    std::lock_guard<std::mutex> g(g_mem_mu);
    for (auto &kv : g_allocs)
        if (!guards_ok(kv.first, kv.second))
            sticky(cudaErrorIllegalAddress, "%s: a write outside %s allocation %p of %zu bytes (its guard zone changed)",
                   where, kv.second.pinned ? "the pinned host" : "the device", (void *)kv.first, kv.second.bytes);
}

/* The allocation holding [p, p + bytes), or nullptr. */
const alloc_info *find(const void *p, size_t bytes, uintptr_t *base) {
    uintptr_t a = (uintptr_t)p;
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    if (a < it->first || a + bytes > it->first + it->second.bytes || (bytes == 0 && a >= it->first + it->second.bytes))
        return nullptr;
    if (base) *base = it->first;
    return &it->second;
}

enum space { HOST_PAGEABLE, HOST_PINNED, DEVICE };
space space_of(const void *p, size_t bytes) {
    std::lock_guard<std::mutex> g(g_mem_mu);
    const alloc_info *a = find(p, bytes ? bytes : 1, nullptr);
    if (!a) return HOST_PAGEABLE;
    return a->pinned ? HOST_PINNED : DEVICE;
}

bool mem_free(void *p, bool pinned, const char *what) {
    if (!p) return true;
    alloc_info info;
    {
        std::lock_guard<std::mutex> g(g_mem_mu);
        auto it = g_allocs.find((uintptr_t)p);
        if (it == g_allocs.end() || it->second.pinned != pinned) {
            fprintf(stderr, "cudasim: %s(%p): not a pointer from %s\n", what, p, pinned ? "cudaMallocHost" : "cudaMalloc");
            return false;
        }
        info = it->second;
        if (!guards_ok(it->first, info))
            sticky(cudaErrorIllegalAddress, "%s: a write outside allocation %p of %zu bytes (its guard zone changed)",
                   what, p, info.bytes);
        g_allocs.erase(it);
    }
    free((unsigned char *)p - GUARD);
    return true;
}

/* ---- streams ---- */
void run_grid(const char *kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()> &body,
              bool skip_first = false);

/* The thread that runs the early blocks of PDL launches for one flushing thread. Kept for the
 * thread's life: each thread has its own fiber stacks (fiber.cpp), which a fresh thread per launch
 * would leave behind. Jobs run one at a time; the flushing thread waits for each. */
class early_thread {
    std::mutex mu_;
    std::condition_variable cv_;
    std::function<void()> job_;
    bool stop_ = false;
    std::thread t_;

    void loop() {
        std::unique_lock<std::mutex> l(mu_);
        for (;;) {
            cv_.wait(l, [&] { return stop_ || job_; });
            if (!job_) return;
            std::function<void()> j = std::move(job_);
            job_ = nullptr;
            l.unlock();
            j();
            l.lock();
        }
    }

public:
    early_thread() : t_([this] { loop(); }) {}
    ~early_thread() {
        {
            std::lock_guard<std::mutex> l(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        t_.join();
    }
    void start(std::function<void()> j) {
        {
            std::lock_guard<std::mutex> l(mu_);
            job_ = std::move(j);
        }
        cv_.notify_all();
    }
};

/* prev, then g (a PDL launch queued right after it) as a GPU may run them: g's block (0, 0, 0) on
 * early_thread up to its pdl_wait, then prev, then the rest of that block, then g's other blocks.
 * A read before the wait of what prev writes sees the old bytes; a write before it, prev sees. */
void run_overlapped(const blip2_sim_work &prev, const blip2_sim_grid &g) {
    static thread_local early_thread early;
    std::mutex mu;
    std::condition_variable cv;
    bool at_wait = false, go = false, done = false, ok = true;
    const std::function<void()> hook = [&] {
        std::unique_lock<std::mutex> l(mu);
        at_wait = true;
        cv.notify_all();
        cv.wait(l, [&] { return go; });
    };
    std::vector<unsigned char> shared(g.smem ? g.smem : 1, 0xff);
    char why[256] = "";
    early.start([&] {
        const bool r = run_block(g.body, g.grid, g.block, uint3{0, 0, 0}, shared.data(), why, sizeof why, &hook);
        std::lock_guard<std::mutex> l(mu);
        ok = r, done = true;
        cv.notify_all();
    });
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return at_wait; }); /* run_block calls the hook once, whether a thread waits or not */
    l.unlock();
    prev.run();
    l.lock();
    go = true;
    cv.notify_all();
    cv.wait(l, [&] { return done; });
    l.unlock();
    if (!ok) sticky(cudaErrorLaunchFailure, "kernel %s, block (0, 0, 0): %s", g.kernel, why);
    else run_grid(g.kernel, g.grid, g.block, g.smem, g.body, true);
}

/* Whether this launch of fn runs overlapped: its first BLIP2_SIM_PDL_EARLY launches (default 100; -1:
 * all, 0: none). A hand-off to the helper thread costs more than a small grid, and a kernel's
 * pre-wait code does the same every launch, so the first ones tell. */
bool overlap_this(const void *fn) {
    static const long long cap = [] {
        const char *e = getenv("BLIP2_SIM_PDL_EARLY");
        return e && *e ? atoll(e) : 100LL;
    }();
    static std::mutex mu;
    static std::map<const void *, long long> runs;
    if (cap < 0) return true;
    std::lock_guard<std::mutex> g(mu);
    return runs[fn]++ < cap;
}

/* A stream's (or a graph's) work in order, a PDL launch right after a kernel overlapping it. */
template <typename Seq> void run_ops(const Seq &ops) {
    for (size_t i = 0; i < ops.size(); i++) {
        if (ops[i].kernel && i + 1 < ops.size() && ops[i + 1].pdl && g_sticky.load() == cudaSuccess &&
            overlap_this(ops[i + 1].pdl->fn)) {
            run_overlapped(ops[i], *ops[i + 1].pdl);
            i++;
        } else {
            ops[i].run();
        }
    }
}

void run_queue(cudaStream_t s) {
    while (!s->queue.empty()) {
        std::deque<blip2_sim_work> ops;
        ops.swap(s->queue);
        run_ops(ops);
    }
}

/* Runs everything queued on s (the host waits for s). */
void flush(cudaStream_t s) {
    std::lock_guard<std::mutex> g(s->mu);
    run_queue(s);
}

void flush_all() {
    flush(&g_default_stream);
    std::vector<cudaStream_t> all;
    {
        std::lock_guard<std::mutex> g(g_streams_mu);
        all.assign(g_streams.begin(), g_streams.end());
    }
    for (cudaStream_t s : all) flush(s);
}

/* A call that may not run while this thread captures (thread-local capture mode): it fails and
 * breaks the capture, as on a GPU. */
bool capture_forbids(const char *what) {
    if (!tl_capture) return false;
    fprintf(stderr, "cudasim: %s while a graph is being captured on this thread\n", what);
    std::lock_guard<std::mutex> g(tl_capture->mu);
    tl_capture->capture_broken = true;
    return true;
}

/* The host waits for s (nullptr: for the whole device): runs the queued work, then checks every
 * guard zone. */
cudaError_t wait_stream(cudaStream_t s, const char *what) {
    if (capture_forbids(what)) return ret(cudaErrorStreamCaptureUnsupported);
    if (s) flush(s);
    else flush_all();
    guards_check_all(what);
    return ret((cudaError_t)g_sticky.load());
}

/* ---- launches ---- */
bool config_ok(const char *kernel, const void *fn, dim3 grid, dim3 block, size_t smem) {
    size_t threads = (size_t)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
        fprintf(stderr, "cudasim: launch %s: grid (%u, %u, %u), block (%u, %u, %u): invalid configuration\n", kernel,
                grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return false;
    }
    int allowed = SMEM_DEFAULT;
    {
        std::lock_guard<std::mutex> g(g_func_mu);
        auto it = g_func_smem.find(fn);
        if (it != g_func_smem.end() && it->second > allowed) allowed = it->second;
    }
    if (smem > (size_t)allowed) {
        fprintf(stderr, "cudasim: launch %s: %zu bytes of dynamic shared memory, %d allowed (cudaFuncSetAttribute)\n",
                kernel, smem, allowed);
        return false;
    }
    return true;
}

void run_grid(const char *kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()> &body,
              bool skip_first) {
    if (g_sticky.load() != cudaSuccess) return; /* the context is dead after a fault */
    std::vector<unsigned char> shared(smem ? smem : 1);
    char why[256];
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                if (skip_first && !(x | y | z)) continue; /* run early (run_overlapped) */
                memset(shared.data(), 0xff, shared.size()); /* uninitialised shared memory reads as NaN */
                if (!run_block(body, grid, block, uint3{x, y, z}, shared.data(), why, sizeof why)) {
                    sticky(cudaErrorLaunchFailure, "kernel %s, block (%u, %u, %u): %s", kernel, x, y, z, why);
                    return;
                }
            }
}

/* ---- memcpy ---- */
bool copy_spaces_ok(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, space *ds, space *ss) {
    *ds = space_of(dst, bytes), *ss = space_of(src, bytes);
    bool dst_dev = *ds == DEVICE, src_dev = *ss == DEVICE;
    switch (kind) {
    case cudaMemcpyHostToDevice: return dst_dev && !src_dev;
    case cudaMemcpyDeviceToHost: return !dst_dev && src_dev;
    case cudaMemcpyDeviceToDevice: return dst_dev && src_dev;
    case cudaMemcpyHostToHost: return !dst_dev && !src_dev;
    case cudaMemcpyDefault: return true;
    }
    return false;
}

} /* namespace */

/* ---- the hooks sim.h and cublas.cpp use ---- */
bool device_accessible(const void *p) {
    if (!p) return true;
    std::lock_guard<std::mutex> g(g_mem_mu);
    return find(p, 0, nullptr) != nullptr;
}

bool device_range(const void *p, size_t bytes) {
    std::lock_guard<std::mutex> g(g_mem_mu);
    const alloc_info *a = find(p, bytes, nullptr);
    return a && !a->pinned;
}

void launch_fail(cudaError_t e, const char *kernel, const char *fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    sticky(e, "launch %s: %s", kernel, buf);
    tl_last = e;
}

namespace {
cudaError_t enqueue_work(cudaStream_t stream, const char *what, blip2_sim_work w) {
    cudaStream_t s = resolve(stream);
    if (!s) {
        fprintf(stderr, "cudasim: %s: invalid stream %p\n", what, (void *)stream);
        return ret(cudaErrorInvalidResourceHandle);
    }
    std::lock_guard<std::mutex> g(s->mu);
    if (s->capturing) s->tape->push_back(std::move(w));
    else s->queue.push_back(std::move(w));
    return cudaSuccess;
}
} /* namespace */

cudaError_t stream_enqueue(cudaStream_t stream, const char *what, std::function<void()> work, bool kernel) {
    blip2_sim_work w;
    w.run = std::move(work);
    w.kernel = kernel;
    return enqueue_work(stream, what, std::move(w));
}

void launch_body(const char *kernel, const void *fn, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                 bool pdl, std::function<void()> body) {
    if (!config_ok(kernel, fn, grid, block, smem)) {
        tl_last = cudaErrorInvalidConfiguration;
        return;
    }
    /* kernel is the string literal rewrite.pl wrote into the launch: it outlives any replay. */
    auto g = std::make_shared<blip2_sim_grid>(blip2_sim_grid{kernel, fn, grid, block, smem, std::move(body)});
    blip2_sim_work w;
    w.run = [g] { run_grid(g->kernel, g->grid, g->block, g->smem, g->body); };
    w.kernel = true;
    if (pdl) w.pdl = g;
    enqueue_work(stream, kernel, std::move(w));
}

} /* namespace blip2_sim */

using namespace blip2_sim;

/* ---- device ---- */
extern "C" cudaError_t cudaGetDeviceCount(int *count) {
    *count = 1;
    return cudaSuccess;
}
extern "C" cudaError_t cudaSetDevice(int device) { return ret(device == 0 ? cudaSuccess : cudaErrorInvalidDevice); }
extern "C" cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int device) {
    if (device != 0) return ret(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "cudasim (CPU emulator of an sm_90 device)");
    p->major = 9, p->minor = 0, p->multiProcessorCount = 132, p->warpSize = 32;
    p->totalGlobalMem = (size_t)80 << 30, p->sharedMemPerBlock = SMEM_DEFAULT, p->sharedMemPerBlockOptin = SMEM_OPTIN;
    p->maxThreadsPerBlock = 1024;
    return cudaSuccess;
}
extern "C" cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device) {
    if (device != 0) return ret(cudaErrorInvalidDevice);
    switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = SMEM_OPTIN; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = SMEM_DEFAULT; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: fprintf(stderr, "cudasim: cudaDeviceGetAttribute(%d) is not emulated\n", (int)attr);
    }
    return ret(cudaErrorInvalidValue);
}
extern "C" cudaError_t cudaDeviceGetStreamPriorityRange(int *least, int *greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return cudaSuccess;
}
extern "C" cudaError_t cudaDeviceSynchronize(void) { return wait_stream(nullptr, "cudaDeviceSynchronize"); }

/* ---- errors ---- */
extern "C" cudaError_t cudaGetLastError(void) {
    cudaError_t e = tl_last;
    tl_last = cudaSuccess;
    if (e == cudaSuccess) e = (cudaError_t)g_sticky.load();
    return e;
}
extern "C" cudaError_t cudaPeekAtLastError(void) {
    return tl_last != cudaSuccess ? tl_last : (cudaError_t)g_sticky.load();
}
extern "C" const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    default: return "cudaError (emulator: unnamed)";
    }
}
extern "C" const char *cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

/* ---- memory ---- */
extern "C" cudaError_t cudaMalloc(void **p, size_t bytes) {
    *p = nullptr;
    if (capture_forbids("cudaMalloc")) return ret(cudaErrorStreamCaptureUnsupported);
    if (bytes > ((size_t)80 << 30)) return ret(cudaErrorMemoryAllocation);
    *p = mem_new(bytes, false);
    return ret(*p ? cudaSuccess : cudaErrorMemoryAllocation);
}
extern "C" cudaError_t cudaFree(void *p) {
    if (capture_forbids("cudaFree")) return ret(cudaErrorStreamCaptureUnsupported);
    flush_all(); /* cudaFree waits for the device: queued work may still use p */
    return ret(mem_free(p, false, "cudaFree") ? (cudaError_t)g_sticky.load() : cudaErrorInvalidDevicePointer);
}
extern "C" cudaError_t cudaMallocHost(void **p, size_t bytes) {
    *p = nullptr;
    if (capture_forbids("cudaMallocHost")) return ret(cudaErrorStreamCaptureUnsupported);
    *p = mem_new(bytes, true);
    return ret(*p ? cudaSuccess : cudaErrorMemoryAllocation);
}
extern "C" cudaError_t cudaFreeHost(void *p) {
    if (capture_forbids("cudaFreeHost")) return ret(cudaErrorStreamCaptureUnsupported);
    flush_all();
    return ret(mem_free(p, true, "cudaFreeHost") ? cudaSuccess : cudaErrorInvalidValue);
}
extern "C" cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *a, const void *p) {
    memset(a, 0, sizeof *a);
    space s = space_of(p, 1);
    a->type = s == DEVICE ? cudaMemoryTypeDevice : s == HOST_PINNED ? cudaMemoryTypeHost : cudaMemoryTypeUnregistered;
    a->device = 0;
    if (s != HOST_PAGEABLE) a->devicePointer = (void *)p, a->hostPointer = s == HOST_PINNED ? (void *)p : nullptr;
    return cudaSuccess;
}

extern "C" cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                                       cudaStream_t stream) {
    if (bytes == 0) return cudaSuccess;
    space ds, ss;
    if (!copy_spaces_ok(dst, src, bytes, kind, &ds, &ss)) {
        fprintf(stderr, "cudasim: cudaMemcpyAsync(%p <- %p, %zu bytes, kind %d): a pointer is not in the memory its kind "
                        "says (or the range leaves its allocation)\n", dst, src, bytes, (int)kind);
        return ret(cudaErrorInvalidValue);
    }
    cudaStream_t s = resolve(stream);
    if (!s) return ret(cudaErrorInvalidResourceHandle);
    bool pageable_src = ss == HOST_PAGEABLE, pageable_dst = ds == HOST_PAGEABLE;
    if ((pageable_src || pageable_dst) && tl_capture) {
        capture_forbids("cudaMemcpyAsync with pageable host memory");
        return ret(cudaErrorStreamCaptureUnsupported);
    }
    if (pageable_src) { /* the driver stages pageable sources before returning: the bytes of now */
        auto copy = std::make_shared<std::vector<unsigned char>>((const unsigned char *)src,
                                                                 (const unsigned char *)src + bytes);
        stream_enqueue(s, "cudaMemcpyAsync", [dst, copy] { memcpy(dst, copy->data(), copy->size()); }, false);
    } else {
        stream_enqueue(s, "cudaMemcpyAsync", [dst, src, bytes] { memcpy(dst, src, bytes); }, false);
    }
    if (pageable_dst) return wait_stream(s, "cudaMemcpyAsync to pageable memory"); /* returns when copied */
    return cudaSuccess;
}
extern "C" cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    if (capture_forbids("cudaMemcpy")) return ret(cudaErrorStreamCaptureUnsupported);
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
    if (e != cudaSuccess) return e;
    return wait_stream(&g_default_stream, "cudaMemcpy");
}
extern "C" cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                                         size_t height, cudaMemcpyKind kind, cudaStream_t stream) {
    if (width == 0 || height == 0) return cudaSuccess;
    if (width > dpitch || width > spitch) return ret(cudaErrorInvalidPitchValue);
    size_t dspan = dpitch * (height - 1) + width, sspan = spitch * (height - 1) + width;
    space ds, ss;
    if (kind != cudaMemcpyDeviceToDevice || !copy_spaces_ok(dst, src, 1, kind, &ds, &ss) || !device_range(dst, dspan) ||
        !device_range(src, sspan)) {
        fprintf(stderr, "cudasim: cudaMemcpy2DAsync: only device-to-device copies inside their allocations are "
                        "emulated (dst %p, src %p, %zu x %zu)\n", dst, src, width, height);
        return ret(cudaErrorInvalidValue);
    }
    return ret(stream_enqueue(stream, "cudaMemcpy2DAsync", [=] {
        for (size_t r = 0; r < height; r++) memmove((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
    }, false));
}
extern "C" cudaError_t cudaMemsetAsync(void *p, int value, size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return cudaSuccess;
    if (!device_range(p, bytes)) {
        fprintf(stderr, "cudasim: cudaMemsetAsync(%p, %zu bytes): not inside a device allocation\n", p, bytes);
        return ret(cudaErrorInvalidValue);
    }
    return ret(stream_enqueue(stream, "cudaMemsetAsync", [=] { memset(p, value, bytes); }, false));
}

/* ---- streams and events ---- */
extern "C" cudaError_t cudaStreamCreateWithPriority(cudaStream_t *s, unsigned int flags, int priority) {
    (void)flags, (void)priority;
    *s = new CUstream_st;
    std::lock_guard<std::mutex> g(g_streams_mu);
    g_streams.insert(*s);
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags) {
    return cudaStreamCreateWithPriority(s, flags, 0);
}
extern "C" cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithPriority(s, 0, 0); }
extern "C" cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    cudaStream_t s = resolve(stream);
    if (!s || s == &g_default_stream) return ret(cudaErrorInvalidResourceHandle);
    flush(s); /* queued work still completes */
    {
        std::lock_guard<std::mutex> g(g_streams_mu);
        g_streams.erase(s);
    }
    delete s;
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    cudaStream_t s = resolve(stream);
    if (!s) return ret(cudaErrorInvalidResourceHandle);
    return wait_stream(s, "cudaStreamSynchronize");
}
extern "C" cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned int flags) {
    (void)flags;
    *e = new CUevent_st;
    return cudaSuccess;
}
extern "C" cudaError_t cudaEventCreate(cudaEvent_t *e) { return cudaEventCreateWithFlags(e, 0); }
extern "C" cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
extern "C" cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t stream) {
    cudaStream_t s = resolve(stream);
    if (!s || !e) return ret(cudaErrorInvalidResourceHandle);
    e->stream = s;
    return cudaSuccess;
}
/* Waits for everything queued on the event's stream (at least what the event covers). */
extern "C" cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (!e) return ret(cudaErrorInvalidResourceHandle);
    if (!e->stream) return cudaSuccess; /* never recorded: complete */
    return wait_stream(e->stream, "cudaEventSynchronize");
}

/* ---- graphs ---- */
extern "C" cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
    (void)mode;
    cudaStream_t s = resolve(stream);
    if (!s || s == &g_default_stream) return ret(cudaErrorStreamCaptureUnsupported);
    if (tl_capture) return ret(cudaErrorIllegalState);
    std::lock_guard<std::mutex> g(s->mu);
    if (s->capturing) return ret(cudaErrorIllegalState);
    s->capturing = true, s->capture_broken = false;
    s->tape = std::make_shared<blip2_sim_tape>();
    tl_capture = s;
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph) {
    *graph = nullptr;
    cudaStream_t s = resolve(stream);
    if (!s || tl_capture != s) return ret(cudaErrorIllegalState);
    tl_capture = nullptr;
    std::lock_guard<std::mutex> g(s->mu);
    s->capturing = false;
    if (s->capture_broken) {
        s->tape.reset();
        return ret(cudaErrorStreamCaptureInvalidated);
    }
    *graph = new CUgraph_st{std::move(s->tape)};
    return cudaSuccess;
}
extern "C" cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags) {
    (void)flags;
    if (!graph) return ret(cudaErrorInvalidValue);
    *exec = new CUgraphExec_st{std::make_shared<blip2_sim_tape>(*graph->tape)};
    return cudaSuccess;
}
extern "C" cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
    delete graph;
    return cudaSuccess;
}
extern "C" cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    delete exec;
    return cudaSuccess;
}
extern "C" cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
    if (!exec) return ret(cudaErrorInvalidResourceHandle);
    std::shared_ptr<blip2_sim_tape> tape = exec->tape;
    return ret(stream_enqueue(stream, "cudaGraphLaunch", [tape] { run_ops(*tape); }, false));
}

/* ---- kernels' attributes ---- */
extern "C" cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, const void *fn) {
    memset(a, 0, sizeof *a);
    a->maxThreadsPerBlock = 1024;
    std::lock_guard<std::mutex> g(g_func_mu);
    auto it = g_func_smem.find(fn);
    a->maxDynamicSharedSizeBytes = it != g_func_smem.end() ? it->second : SMEM_DEFAULT;
    return cudaSuccess;
}
extern "C" cudaError_t cudaFuncSetAttribute(const void *fn, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
    if (value < 0 || value > SMEM_OPTIN) return ret(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> g(g_func_mu);
    g_func_smem[fn] = value;
    return cudaSuccess;
}

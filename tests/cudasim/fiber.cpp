/* The emulator's thread blocks (tests/cudasim/README.md). A block's threads are fibers on the
 * launching OS thread, with a hand-written context switch (x86-64 SysV: the callee-saved registers
 * and the stack pointer), because a block of 256 threads and a grid of thousands of blocks must
 * not cost a system call per switch as swapcontext does.
 *
 * A fiber runs until it reaches a barrier (__syncthreads), a warp shuffle, or its end. Between
 * two block barriers the warps run one after the other, each as far as it can (through its
 * shuffles, which release when all 32 lanes wait at one), in an order that alternates from one
 * phase to the next. When no warp can go on, the block barrier is released if every live thread
 * waits at it; otherwise the kernel is stuck (on a GPU: a hang or undefined behaviour) and the
 * launch fails with a description. Sequential warps are the adversarial case for shared memory: a
 * warp that overwrites what another has yet to read, for want of a barrier, is caught. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <vector>

#include "fiber.h"

extern "C" void blip2_sim_switch(void **save_sp, void *next_sp);
extern "C" void blip2_sim_fiber_start(void);

/* Saves rbp, rbx, r12–r15 on the current stack, stores the stack pointer in *save_sp (rdi), loads
 * next_sp (rsi) and pops the same registers from there; ret resumes the other context. */
__asm__(".text\n"
        ".globl blip2_sim_switch\n"
        ".type blip2_sim_switch,@function\n"
        "blip2_sim_switch:\n"
        "    pushq %rbp\n"
        "    pushq %rbx\n"
        "    pushq %r12\n"
        "    pushq %r13\n"
        "    pushq %r14\n"
        "    pushq %r15\n"
        "    movq %rsp, (%rdi)\n"
        "    movq %rsi, %rsp\n"
        "    popq %r15\n"
        "    popq %r14\n"
        "    popq %r13\n"
        "    popq %r12\n"
        "    popq %rbx\n"
        "    popq %rbp\n"
        "    ret\n"
        ".size blip2_sim_switch, .-blip2_sim_switch\n");

namespace blip2_sim {

__thread thread_coords *tl_coords; /* the emulated thread running now (sim.h's current()) */

namespace {

enum { F_READY, F_AT_BLOCK, F_AT_WARP, F_AT_PDL, F_DONE };

/* One cp.async in flight: group 0 until the thread commits it, then its group's number (from 1). */
struct copy_in_flight {
    void *dst;
    const void *src; /* nullptr: zeros */
    unsigned group;
};

struct fiber {
    void *sp;
    int state;
    thread_coords xy;
    uint64_t shfl[2]; /* the values this lane offers at shuffles, alternately (see shuffle_xor) */
    unsigned n_shfl;  /* shuffles done */
    std::vector<copy_in_flight> copies; /* cp.async issued, not yet waited for */
    unsigned n_groups;                  /* cp.async groups committed */
};

/* Per OS thread: the stacks (kept between launches), the block being run, the current fiber. */
struct runner {
    std::vector<char *> stacks;
    std::vector<fiber> f;
    const std::function<void()> *body = nullptr;
    const std::function<void()> *pdl_hook = nullptr; /* run_block's at_pdl_wait, until it is called */
    void *sched_sp = nullptr;
    fiber *cur = nullptr;
    void *smem = nullptr;
    unsigned round = 0, phase = 0;
    char why[256];
    bool failed = false;
};
__thread runner *tl; /* a plain pointer: no thread_local init guard on every access */

constexpr size_t STACK_BYTES = 64 * 1024;

/* Unmaps a thread's fiber stacks and frees its runner when the thread ends: the engine's threads
 * come and go, and the stacks of every thread that ever ran a block would otherwise exhaust the
 * process's memory maps. */
struct runner_owner {
    ~runner_owner() {
        if (!tl) return;
        const size_t bytes = STACK_BYTES + (size_t)sysconf(_SC_PAGESIZE);
        for (char *top : tl->stacks) munmap(top - bytes, bytes);
        delete tl;
        tl = nullptr;
    }
};
thread_local runner_owner tl_owner;

runner &runner_get() {
    if (!tl) {
        tl = new runner; /* one per OS thread that launches, freed with the thread (runner_owner) */
        (void)&tl_owner; /* odr-use: constructs the owner, whose destructor runs at thread exit */
    }
    return *tl;
}

char *stack_get(size_t i) {
    static const long page = sysconf(_SC_PAGESIZE);
    while (tl->stacks.size() <= i) {
        /* A guard page under each stack: an overflow faults instead of corrupting a neighbour. */
        size_t bytes = STACK_BYTES + (size_t)page;
        void *m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            perror("cudasim: mmap of a fiber stack");
            abort();
        }
        mprotect(m, (size_t)page, PROT_NONE);
        tl->stacks.push_back((char *)m + bytes);
    }
    return tl->stacks[i];
}

/* A fresh stack whose first switch-in "returns" into blip2_sim_fiber_start with the stack aligned
 * as after a call (rsp ≡ 8 mod 16). */
void *stack_prepare(char *top) {
    uintptr_t t = (uintptr_t)top & ~(uintptr_t)15;
    void **sp = (void **)t;
    *--sp = nullptr;                              /* fake return address of the start function */
    *--sp = (void *)blip2_sim_fiber_start;       /* popped by ret */
    for (int i = 0; i < 6; i++) *--sp = nullptr; /* rbp rbx r12–r15 */
    return sp;
}

inline void yield_to_scheduler() { blip2_sim_switch(&tl->cur->sp, tl->sched_sp); }

void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void fail(const char *fmt, ...) {
    if (tl->failed) return;
    tl->failed = true;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tl->why, sizeof tl->why, fmt, ap);
    va_end(ap);
}

inline void run_fiber(fiber *f) {
    tl->cur = f;
    tl_coords = &f->xy;
    blip2_sim_switch(&tl->sched_sp, f->sp);
    tl_coords = nullptr;
    tl->cur = nullptr;
}

/* Runs the ready lanes of warp [w0, w1) until they wait or end: forwards or backwards from a
 * rotating start, alternately. */
void run_lanes(size_t w0, size_t w1) {
    size_t n = w1 - w0, start = (tl->round * 7u) % n;
    bool backward = tl->round & 1;
    tl->round++;
    fiber *f = tl->f.data() + w0;
    size_t i = start;
    for (size_t k = 0; k < n && !tl->failed; k++) {
        if (f[i].state == F_READY) run_fiber(&f[i]);
        if (backward) i = i == 0 ? n - 1 : i - 1;
        else i = i + 1 == n ? 0 : i + 1;
    }
}

/* Releases warp [w0, w1) when all its live lanes wait at a shuffle; false when it cannot go on. */
bool release_warp(size_t w0, size_t w1) {
    int at_warp = 0, other = 0, done = 0;
    for (size_t i = w0; i < w1; i++) {
        int s = tl->f[i].state;
        at_warp += s == F_AT_WARP, done += s == F_DONE, other += s == F_AT_BLOCK || s == F_AT_PDL;
    }
    if (!at_warp) return false;
    if (done) {
        fail("warp %zu: %d lanes shuffle while %d lanes of the warp have exited", w0 / 32, at_warp, done);
        return false;
    }
    if (other) return false; /* lanes split between a shuffle and __syncthreads: stuck */
    for (size_t i = w0; i < w1; i++) tl->f[i].state = F_READY;
    return true;
}

/* One phase (up to the next __syncthreads): the warps one after the other, each as far as it can
 * go, in an order that alternates between phases. A warp that writes shared memory another warp
 * has yet to read in the same phase is caught this way: on a GPU the warps race. */
void run_phase() {
    size_t n = tl->f.size(), nw = (n + 31) / 32;
    bool backward = tl->phase & 1;
    size_t start = (tl->phase / 2 * 3u) % nw;
    tl->phase++;
    for (size_t k = 0; k < nw && !tl->failed; k++) {
        size_t w = backward ? (start + nw - k) % nw : (start + k) % nw;
        size_t w0 = w * 32, w1 = w0 + 32 < n ? w0 + 32 : n;
        do run_lanes(w0, w1);
        while (!tl->failed && release_warp(w0, w1));
    }
}

/* Releases the block barrier when every live thread waits at it; 0 when it could not. */
int release_block() {
    int live = 0, at_block = 0;
    for (fiber &f : tl->f)
        if (f.state != F_DONE) live++, at_block += f.state == F_AT_BLOCK;
    if (!live || at_block != live) return 0;
    for (fiber &f : tl->f)
        if (f.state == F_AT_BLOCK) f.state = F_READY;
    return 1;
}

/* Runs the kernel before (run_block's at_pdl_wait), once; from then on pdl_wait returns at once. */
void fire_pdl_hook() {
    const std::function<void()> *hook = tl->pdl_hook;
    tl->pdl_hook = nullptr;
    (*hook)();
}

/* Calls the PDL hook once threads wait at pdl_wait and nothing else can go on, then lets them go. */
bool release_pdl() {
    bool any = false;
    for (fiber &f : tl->f) any |= f.state == F_AT_PDL;
    if (!any) return false;
    fire_pdl_hook();
    for (fiber &f : tl->f)
        if (f.state == F_AT_PDL) f.state = F_READY;
    return true;
}

bool all_done() {
    for (fiber &f : tl->f)
        if (f.state != F_DONE) return false;
    return true;
}

void describe_stuck() {
    int at_block = 0, at_warp = 0, done = 0;
    for (fiber &f : tl->f) at_block += f.state == F_AT_BLOCK, at_warp += f.state == F_AT_WARP, done += f.state == F_DONE;
    fail("stuck: %d threads wait at __syncthreads, %d at a shuffle, %d have exited (a barrier not every thread "
         "reaches)", at_block, at_warp, done);
}

} /* namespace */

void outside_kernel() {
    fprintf(stderr, "cudasim: a device built-in (threadIdx, __syncthreads, ...) used outside a kernel\n");
    abort();
}

void block_bounds(long long most) {
    current();
    const size_t n = tl->f.size();
    if (n <= (size_t)most) return;
    fail("a block of %zu threads for a kernel whose __launch_bounds__ allows %lld", n, most);
    tl->cur->state = F_DONE;
    yield_to_scheduler();
}

void sync_block() {
    current();
    tl->cur->state = F_AT_BLOCK;
    yield_to_scheduler();
}

/* One barrier per shuffle: a lane offers its value in slot n_shfl % 2, waits for the warp, and
 * reads its partner's. It cannot offer into the same slot again before the next shuffle's barrier,
 * which every lane reaches only after reading this one. */
uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, int width) {
    current();
    fiber *f = tl->cur;
    if (mask != 0xffffffffu || width != 32 || tl->f.size() % 32 != 0) {
        fail("a shuffle with mask %#x, width %d, in a block of %zu threads (only full-warp shuffles in blocks of whole "
             "warps are emulated)", mask, width, tl->f.size());
        f->state = F_DONE;
        yield_to_scheduler();
    }
    unsigned slot = f->n_shfl++ & 1;
    f->shfl[slot] = bits;
    f->state = F_AT_WARP;
    yield_to_scheduler();
    size_t idx = (size_t)(f - tl->f.data()), lane = idx & 31;
    return tl->f[(idx & ~(size_t)31) | ((lane ^ (size_t)(lane_mask & 31)) & 31)].shfl[slot];
}

void cp_async(void *dst, const void *src) {
    current();
    memset(dst, 0xff, 16); /* NaN in every 16-bit and 32-bit float type until the copy lands */
    tl->cur->copies.push_back(copy_in_flight{dst, src, 0});
}

void cp_async_commit() {
    current();
    fiber *f = tl->cur;
    f->n_groups++;
    for (copy_in_flight &c : f->copies)
        if (!c.group) c.group = f->n_groups;
}

/* Lands every committed copy but those of the newest n groups (cp.async.wait_group n). */
void cp_async_wait(int n) {
    current();
    fiber *f = tl->cur;
    size_t kept = 0;
    for (copy_in_flight &c : f->copies) {
        if (c.group && c.group + (unsigned)n <= f->n_groups) {
            if (c.src) memcpy(c.dst, c.src, 16);
            else memset(c.dst, 0, 16);
        } else {
            f->copies[kept++] = c;
        }
    }
    f->copies.resize(kept);
}

void pdl_wait() {
    current();
    if (!tl->pdl_hook) return;
    tl->cur->state = F_AT_PDL;
    yield_to_scheduler();
}

void *dynamic_smem() {
    current();
    return tl->smem;
}

bool run_block(const std::function<void()> &body, dim3 grid, dim3 block, uint3 bid, void *smem, char *why,
               size_t why_n, const std::function<void()> *at_pdl_wait) {
    runner &r = runner_get();
    size_t n = (size_t)block.x * block.y * block.z;
    r.f.assign(n, fiber{});
    r.body = &body;
    r.smem = smem;
    r.failed = false;
    r.pdl_hook = at_pdl_wait;
    for (size_t i = 0; i < n; i++) {
        fiber &f = r.f[i];
        f.state = F_READY;
        f.xy.thread_idx = uint3{(unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                                (unsigned)(i / ((size_t)block.x * block.y))};
        f.xy.block_idx = bid;
        f.xy.block_dim = block;
        f.xy.grid_dim = grid;
        f.sp = stack_prepare(stack_get(i));
    }
    for (;;) {
        run_phase();
        if (r.failed || all_done()) break;
        if (release_block() || release_pdl()) continue;
        describe_stuck();
        break;
    }
    if (r.pdl_hook) fire_pdl_hook(); /* no thread reached pdl_wait (or the block failed first) */
    if (r.failed) snprintf(why, why_n, "%s", r.why);
    return !r.failed;
}

} /* namespace blip2_sim */

/* Where a fresh fiber starts: runs the kernel body for its thread, then hands back for good. */
extern "C" void blip2_sim_fiber_start(void) {
    using namespace blip2_sim;
    (*tl->body)();
    if (!tl->cur->copies.empty())
        fail("thread %u of block (%u,%u,%u) ended with %zu cp.async copies it never waited for",
             tl->cur->xy.thread_idx.x, tl->cur->xy.block_idx.x, tl->cur->xy.block_idx.y, tl->cur->xy.block_idx.z,
             tl->cur->copies.size());
    tl->cur->state = F_DONE;
    yield_to_scheduler();
    abort(); /* a finished fiber is never resumed */
}

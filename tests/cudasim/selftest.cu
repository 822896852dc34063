/* The emulator's own test: kernels with the bugs it exists to catch must fail under it, and a correct
 * one must pass. Built only for the emulator (rewrite.pl + prelude.h, like kernels/cuda). Each case
 * runs in a child process, because a fault is sticky for the rest of a process, as on a GPU. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <mma.h>

#include <cstdint>

constexpr int NT = 128;

/* Correct: each warp's sum through shuffles, then the block's through shared memory. */
__global__ void k_block_sum(float *out, const float *x) {
    __shared__ float part[NT / 32];
    float v = x[blockIdx.x * NT + threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = part[0] + part[1] + part[2] + part[3];
}

/* Missing barrier: thread i reads what thread i + 32 (another warp) wrote in the same phase. */
__global__ void k_missing_barrier(int *out) {
    __shared__ int sh[NT];
    sh[threadIdx.x] = (int)(threadIdx.x + 1000 * blockIdx.x);
    out[blockIdx.x * NT + threadIdx.x] = sh[(threadIdx.x + 32) % NT];
}

/* A barrier only some lanes of a warp reach, the others at a shuffle: a hang on a GPU. */
__global__ void k_split_warp(int *out) {
    int v = (int)threadIdx.x;
    if ((threadIdx.x & 31) < 16) __syncthreads();
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

__global__ void k_fill(int *out, int n, int value) {
    for (int i = (int)threadIdx.x; i < n; i += (int)blockDim.x) out[i] = value;
}

/* One warp, mma.sync m16n8k16 as internal.cuh's mma_16816 issues it: each lane gathers its
 * fragments by the PTX ISA's layout (g = lane / 4, t = lane % 4) from a [16×16] and b [16×8]
 * (row-major, T), adds to c [16×8] (fp32, row-major) and scatters its four results back. */
template <typename T> __global__ void k_mma_tile(float *c, const T *a, const T *b) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    auto two = [](T lo, T hi) {
        uint16_t l, h;
        memcpy(&l, &lo, 2), memcpy(&h, &hi, 2);
        return (unsigned)l | (unsigned)h << 16;
    };
    unsigned fa[4], fb[2];
    for (int r = 0; r < 4; r++) {
        const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        fa[r] = two(a[row * 16 + col], a[row * 16 + col + 1]);
    }
    for (int r = 0; r < 2; r++) fb[r] = two(b[(2 * t + 8 * r) * 8 + g], b[(2 * t + 8 * r + 1) * 8 + g]);
    float d[4];
    for (int i = 0; i < 4; i++) d[i] = c[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
    blip2_sim::mma_m16n8k16<T>(d, fa, fb);
    for (int i = 0; i < 4; i++) c[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}

/* One warp, the fragments of C = A·B [16×16] through ldmatrix as the attention kernels take them:
 * A from a row-major [16 m][16 k] tile, B once from [16 n][16 k] (no trans) and once from
 * [16 k][16 n] (trans), each as two 8-column mma, into c1 and c2 [16×16] (row-major). The tiles
 * sit in shared memory with a padded row stride, as in the kernels. */
template <typename T> __global__ void k_ldmatrix_tile(float *c1, float *c2, const T *a, const T *b) {
    constexpr int S = 24; /* halves a shared row: 48 bytes, 16-byte aligned rows */
    __shared__ __align__(16) uint16_t As[16 * S], Bn[16 * S], Bk[16 * S];
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int i = lane; i < 256; i += 32) {
        const int r = i / 16, col = i % 16;
        memcpy(&As[r * S + col], &a[i], 2);            /* A [m][k] */
        memcpy(&Bk[r * S + col], &b[i], 2);            /* B [k][n] */
        memcpy(&Bn[col * S + r], &b[i], 2);            /* B [n][k] */
    }
    __syncwarp();
    unsigned fa[4], fn[4], fk[4];
    blip2_sim::ldmatrix_x4(fa, &As[(lane % 16) * S + lane / 16 * 8], false);
    blip2_sim::ldmatrix_x4(fn, &Bn[(lane / 16 * 8 + lane % 8) * S + lane / 8 % 2 * 8], false);
    blip2_sim::ldmatrix_x4(fk, &Bk[(lane % 16) * S + lane / 16 * 8], true);
    for (int nt = 0; nt < 2; nt++) {
        float d1[4] = {0, 0, 0, 0}, d2[4] = {0, 0, 0, 0};
        const unsigned bn[2] = {fn[2 * nt], fn[2 * nt + 1]}, bk[2] = {fk[2 * nt], fk[2 * nt + 1]};
        blip2_sim::mma_m16n8k16<T>(d1, fa, bn);
        blip2_sim::mma_m16n8k16<T>(d2, fa, bk);
        for (int i = 0; i < 4; i++) {
            const int o = (g + 8 * (i >> 1)) * 16 + nt * 8 + 2 * t + (i & 1);
            c1[o] = d1[i], c2[o] = d2[i];
        }
    }
}

/* Half a warp issues the mma: a hang or garbage on a GPU. */
__global__ void k_mma_half_warp(float *c) {
    float d[4] = {0, 0, 0, 0};
    const unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    if (threadIdx.x < 16) blip2_sim::mma_m16n8k16<__half>(d, a, b);
    c[threadIdx.x] = d[0];
}

/* cp.async in two groups: a thread's first copy is waited for (wait_group 1 leaves only the newer
 * group in flight), its second only after the neighbour warp's read of it. out[0..NT) gets the
 * neighbour's first copy (the data), out[NT..2NT) its second (not landed yet: NaN's bits). With
 * `never` the second is never waited for. */
__global__ void k_cp_async_groups(int *out, const int *src, bool never) {
    __shared__ __align__(16) int first[NT * 4], second[NT * 4];
    const int t = threadIdx.x, other = (t + 32) % NT;
    blip2_sim::cp_async(&first[t * 4], &src[t * 4]);
    blip2_sim::cp_async_commit();
    blip2_sim::cp_async(&second[t * 4], &src[t * 4]);
    blip2_sim::cp_async_commit();
    blip2_sim::cp_async_wait(1);
    __syncthreads();
    out[t] = first[other * 4];
    out[NT + t] = second[other * 4];
    __syncthreads(); /* every read before any thread waits for its second copy */
    if (!never) blip2_sim::cp_async_wait(0);
}

/* A kernel launched with programmatic dependent launch that reads x before its griddepcontrol.wait
 * (into seen[2 block]) and after it (seen[2 block + 1]). */
__global__ void k_read_around_wait(int *seen, const int *x) {
    const int before = x[0];
    blip2_sim::pdl_wait();
    if (threadIdx.x == 0) seen[2 * blockIdx.x] = before, seen[2 * blockIdx.x + 1] = x[0];
}

/* At most 64 threads a block. */
__global__ void __launch_bounds__(64) k_bounded(int *out) { out[threadIdx.x] = 1; }

/* A 16-byte load from p + offset bytes. */
__global__ void k_load16(uint4 *out, const char *p, int offset) { out[threadIdx.x] = *(const uint4 *)(p + offset); }

static int fail_if(bool bad, const char *what) {
    if (bad) fprintf(stderr, "selftest: %s\n", what);
    return bad ? 1 : 0;
}

static int case_correct_sum() {
    const int B = 3;
    float h[B * NT], *x, *out, got[B];
    for (int i = 0; i < B * NT; i++) h[i] = (float)(i % 7);
    cudaMalloc((void **)&x, sizeof h);
    cudaMalloc((void **)&out, sizeof got);
    cudaMemcpy(x, h, sizeof h, cudaMemcpyHostToDevice);
    k_block_sum<<<B, NT>>>(out, x);
    if (fail_if(cudaMemcpy(got, out, sizeof got, cudaMemcpyDeviceToHost) != cudaSuccess, "sum: error")) return 1;
    for (int b = 0; b < B; b++) {
        float want = 0;
        for (int i = 0; i < NT; i++) want += h[b * NT + i];
        if (fail_if(got[b] != want, "sum: wrong value")) return 1;
    }
    return 0;
}

/* Passes (exit 0) when the missing barrier is visible as a wrong value. */
static int case_missing_barrier() {
    const int B = 2;
    int *out, got[B * NT];
    cudaMalloc((void **)&out, sizeof got);
    k_missing_barrier<<<B, NT>>>(out);
    cudaMemcpy(got, out, sizeof got, cudaMemcpyDeviceToHost);
    int wrong = 0;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < NT; i++) wrong += got[b * NT + i] != (i + 32) % NT + 1000 * b;
    return fail_if(wrong == 0, "missing barrier: every value right (the race went unseen)");
}

static int case_split_warp() {
    int *out;
    cudaMalloc((void **)&out, NT * sizeof(int));
    k_split_warp<<<1, NT>>>(out);
    return fail_if(cudaDeviceSynchronize() == cudaSuccess, "split warp: not reported");
}

static int case_host_pointer() {
    static int host[NT];
    k_fill<<<1, NT>>>(host, NT, 1);
    return fail_if(cudaDeviceSynchronize() != cudaErrorIllegalAddress, "host pointer: not reported");
}

static int case_out_of_bounds() {
    int *out;
    cudaMalloc((void **)&out, 10 * sizeof(int));
    k_fill<<<1, NT>>>(out, 11, 7); /* one past the end */
    return fail_if(cudaDeviceSynchronize() == cudaSuccess, "write past the end: not reported");
}

/* The host reads a pinned result before waiting: it must not have arrived yet. */
static int case_read_before_wait() {
    int *dev, *pinned;
    cudaStream_t s;
    cudaStreamCreate(&s);
    cudaMalloc((void **)&dev, sizeof(int));
    cudaMallocHost((void **)&pinned, sizeof(int));
    *pinned = -1;
    k_fill<<<1, 32, 0, s>>>(dev, 1, 42);
    cudaMemcpyAsync(pinned, dev, sizeof(int), cudaMemcpyDeviceToHost, s);
    int early = *pinned;
    cudaStreamSynchronize(s);
    return fail_if(early != -1, "read before the wait saw the result") | fail_if(*pinned != 42, "wait: wrong result");
}

/* A captured graph replays the launch with its recorded arguments. */
static int case_graph_replay() {
    int *dev, got[4];
    cudaStream_t s;
    cudaGraph_t g;
    cudaGraphExec_t e;
    cudaStreamCreate(&s);
    cudaMalloc((void **)&dev, sizeof got);
    cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
    k_fill<<<1, 32, 0, s>>>(dev, 4, 5);
    if (fail_if(cudaStreamSynchronize(s) == cudaSuccess, "a wait inside a capture was allowed")) return 1;
    if (fail_if(cudaStreamEndCapture(s, &g) != cudaErrorStreamCaptureInvalidated, "broken capture not invalid")) return 1;
    cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
    k_fill<<<1, 32, 0, s>>>(dev, 4, 5);
    if (fail_if(cudaStreamEndCapture(s, &g) != cudaSuccess || cudaGraphInstantiate(&e, g, 0) != cudaSuccess, "capture"))
        return 1;
    cudaMemsetAsync(dev, 0, sizeof got, s);
    cudaGraphLaunch(e, s);
    cudaMemcpyAsync(got, dev, sizeof got, cudaMemcpyDeviceToHost, s);
    return fail_if(got[0] != 5 || got[3] != 5, "graph replay: wrong values");
}

/* Distinct small values (exact products and sums): a transposed or shifted fragment shows. */
template <typename T> static int mma_case(T (*from)(float), float (*to)(T), const char *what) {
    T ha[256], hb[128];
    float c0[128], got[128];
    for (int i = 0; i < 256; i++) ha[i] = from((float)(i % 13 - 6) * 0.5f);
    for (int i = 0; i < 128; i++) hb[i] = from((float)(i % 11 - 5)), c0[i] = (float)(i % 3) * 0.25f;
    T *da, *db;
    float *dc;
    cudaMalloc((void **)&da, sizeof ha), cudaMalloc((void **)&db, sizeof hb), cudaMalloc((void **)&dc, sizeof c0);
    cudaMemcpy(da, ha, sizeof ha, cudaMemcpyHostToDevice), cudaMemcpy(db, hb, sizeof hb, cudaMemcpyHostToDevice);
    cudaMemcpy(dc, c0, sizeof c0, cudaMemcpyHostToDevice);
    k_mma_tile<T><<<1, 32>>>(dc, da, db);
    if (fail_if(cudaMemcpy(got, dc, sizeof got, cudaMemcpyDeviceToHost) != cudaSuccess, what)) return 1;
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 8; n++) {
            float s = c0[m * 8 + n];
            for (int k = 0; k < 16; k++) s += to(ha[m * 16 + k]) * to(hb[k * 8 + n]);
            if (fail_if(got[m * 8 + n] != s, what)) return 1;
        }
    return 0;
}
static __half half_from(float v) { return __float2half(v); }
static float half_to(__half v) { return __half2float(v); }
static __nv_bfloat16 bf16_from(float v) { return __float2bfloat16(v); }
static float bf16_to(__nv_bfloat16 v) { return __bfloat162float(v); }
static int case_mma() {
    return mma_case<__half>(half_from, half_to, "mma m16n8k16 f16: wrong values") ||
           mma_case<__nv_bfloat16>(bf16_from, bf16_to, "mma m16n8k16 bf16: wrong values");
}

/* ldmatrix (both forms) feeding mma gives the plain product: the fragment maps agree. */
template <typename T> static int ldmatrix_case(T (*from)(float), float (*to)(T), const char *what) {
    T ha[256], hb[256];
    float got1[256], got2[256];
    for (int i = 0; i < 256; i++) ha[i] = from((float)(i % 13 - 6) * 0.5f), hb[i] = from((float)(i % 11 - 5));
    T *da, *db;
    float *d1, *d2;
    cudaMalloc((void **)&da, sizeof ha), cudaMalloc((void **)&db, sizeof hb);
    cudaMalloc((void **)&d1, sizeof got1), cudaMalloc((void **)&d2, sizeof got2);
    cudaMemcpy(da, ha, sizeof ha, cudaMemcpyHostToDevice), cudaMemcpy(db, hb, sizeof hb, cudaMemcpyHostToDevice);
    k_ldmatrix_tile<T><<<1, 32>>>(d1, d2, da, db);
    if (fail_if(cudaMemcpy(got1, d1, sizeof got1, cudaMemcpyDeviceToHost) != cudaSuccess, what)) return 1;
    cudaMemcpy(got2, d2, sizeof got2, cudaMemcpyDeviceToHost);
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float s = 0;
            for (int k = 0; k < 16; k++) s += to(ha[m * 16 + k]) * to(hb[k * 16 + n]);
            if (fail_if(got1[m * 16 + n] != s || got2[m * 16 + n] != s, what)) return 1;
        }
    return 0;
}
static int case_ldmatrix() {
    return ldmatrix_case<__half>(half_from, half_to, "ldmatrix + mma f16: wrong values") ||
           ldmatrix_case<__nv_bfloat16>(bf16_from, bf16_to, "ldmatrix + mma bf16: wrong values");
}

static int case_mma_half_warp() {
    float *c;
    cudaMalloc((void **)&c, 32 * sizeof(float));
    k_mma_half_warp<<<1, 32>>>(c);
    return fail_if(cudaDeviceSynchronize() == cudaSuccess, "mma by half a warp: not reported");
}

static int cp_async_launch(int *got, bool never) {
    int h[NT * 4], *src, *out;
    for (int i = 0; i < NT * 4; i++) h[i] = i;
    cudaMalloc((void **)&src, sizeof h), cudaMalloc((void **)&out, 2 * NT * sizeof(int));
    cudaMemcpy(src, h, sizeof h, cudaMemcpyHostToDevice);
    k_cp_async_groups<<<1, NT>>>(out, src, never);
    return cudaMemcpy(got, out, 2 * NT * sizeof(int), cudaMemcpyDeviceToHost) != cudaSuccess;
}

static int case_cp_async() {
    int got[2 * NT], wrong_first = 0, landed_second = 0;
    if (fail_if(cp_async_launch(got, false), "cp.async: launch failed")) return 1;
    for (int t = 0; t < NT; t++) wrong_first += got[t] != (t + 32) % NT * 4, landed_second += got[NT + t] != -1;
    return fail_if(wrong_first, "cp.async: a waited-for copy did not land") |
           fail_if(landed_second, "cp.async: a copy still in flight was visible");
}

static int case_cp_async_never_waited() {
    int got[2 * NT];
    return fail_if(!cp_async_launch(got, true), "cp.async never waited for: not reported");
}

/* x = 1; k_fill sets x = 7; a PDL launch reads x around its wait. Its first block starts before
 * k_fill (so it sees 1 before the wait), its others after; every block sees 7 after the wait. */
static int case_pdl() {
    int *x, *seen, got[4], one = 1;
    cudaStream_t s;
    cudaStreamCreate(&s);
    cudaMalloc((void **)&x, sizeof(int)), cudaMalloc((void **)&seen, sizeof got);
    cudaMemcpy(x, &one, sizeof one, cudaMemcpyHostToDevice);
    k_fill<<<1, 32, 0, s>>>(x, 1, 7);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {dim3(2), dim3(64), 0, s, attr, 1};
    cudaLaunchKernelEx(&cfg, k_read_around_wait, seen, (const int *)x);
    if (fail_if(cudaStreamSynchronize(s) != cudaSuccess, "pdl: error")) return 1;
    cudaMemcpy(got, seen, sizeof got, cudaMemcpyDeviceToHost);
    return fail_if(got[0] != 1, "pdl: the first block did not start before the kernel before it") |
           fail_if(got[1] != 7 || got[3] != 7, "pdl: a read after the wait missed the kernel before") |
           fail_if(got[2] != 7, "pdl: a later block started early");
}

static int case_launch_bounds() {
    int *out;
    cudaMalloc((void **)&out, 128 * sizeof(int));
    k_bounded<<<1, 64>>>(out);
    if (fail_if(cudaDeviceSynchronize() != cudaSuccess, "launch bounds: a block within them failed")) return 1;
    k_bounded<<<1, 128>>>(out);
    return fail_if(cudaDeviceSynchronize() == cudaSuccess, "launch bounds: a block of twice their threads ran");
}

/* An aligned 16-byte load runs; a misaligned one (a fault on a GPU) stops the process (UBSan's
 * alignment check, CMakeLists.txt), so it is made in a grandchild. */
static int case_misaligned() {
    char *p;
    uint4 *out;
    cudaMalloc((void **)&p, 64), cudaMalloc((void **)&out, 32 * sizeof(uint4));
    static const char zeros[64] = {0};
    cudaMemcpy(p, zeros, sizeof zeros, cudaMemcpyHostToDevice);
    k_load16<<<1, 32>>>(out, p, 16);
    if (fail_if(cudaDeviceSynchronize() != cudaSuccess, "aligned 16-byte load failed")) return 1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        k_load16<<<1, 32>>>(out, p, 8);
        cudaDeviceSynchronize();
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return fail_if(WIFEXITED(status) && WEXITSTATUS(status) == 0, "misaligned 16-byte load: not reported");
}

static int run_child(int (*fn)(), const char *name) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        if (!getenv("SELFTEST_STDERR")) freopen("/dev/null", "w", stderr); /* the planted bugs' reports (=1 keeps them) */
        _exit(fn());
    }
    int status = 0;
    waitpid(pid, &status, 0);
    int ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    printf("%s %s\n", ok ? "ok  " : "FAIL", name);
    return ok ? 0 : 1;
}

int main() {
    int bad = 0;
    bad += run_child(case_correct_sum, "a correct block reduction gives the right sums");
    bad += run_child(case_missing_barrier, "a missing __syncthreads gives wrong values");
    bad += run_child(case_split_warp, "a warp split between __syncthreads and a shuffle is reported");
    bad += run_child(case_host_pointer, "a host pointer passed to a kernel is reported");
    bad += run_child(case_out_of_bounds, "a write past a device allocation is reported");
    bad += run_child(case_read_before_wait, "a result read before the wait has not arrived");
    bad += run_child(case_graph_replay, "graph capture: a wait breaks it; a replay repeats the launch");
    bad += run_child(case_mma, "mma.sync m16n8k16 (f16, bf16) gives the exact products in the PTX fragment layout");
    bad += run_child(case_mma_half_warp, "an mma.sync that half the warp skips is reported");
    bad += run_child(case_ldmatrix, "ldmatrix x4 (rows and trans) feeds mma.sync the fragments of the plain product");
    bad += run_child(case_cp_async, "cp.async lands at the wait for its group; before that its bytes read as NaN");
    bad += run_child(case_cp_async_never_waited, "a thread that ends with cp.async copies in flight is reported");
    bad += run_child(case_pdl, "a PDL launch's first block runs up to its wait before the kernel before it");
    bad += run_child(case_launch_bounds, "a block of more threads than the kernel's __launch_bounds__ is reported");
    bad += run_child(case_misaligned, "a misaligned 16-byte load stops the process");
    printf("%d of 15 failed\n", bad);
    return bad ? 1 : 0;
}

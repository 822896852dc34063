/* A CPU stand-in for cuBLAS and cuBLASLt, used only by the emulator tests (tests/cudasim): the few
 * entry points kernels/cuda calls, defined against NVIDIA's own headers so the prototypes and types
 * are the library's. Like the library it checks shapes, leading dimensions, types, descriptors and
 * the alignments a cuBLASLt preference promised; beyond it, it checks that every matrix lies whole
 * inside one cudaMalloc allocation, so a host pointer or an extent past the end fails here (with a
 * line on stderr) instead of corrupting memory or passing by luck. The arithmetic widens 16-bit
 * inputs exactly (rounding fp32 to TF32 where the compute type allows tensor cores), multiplies
 * with OpenBLAS in double and rounds each result once to fp32. The work goes through the
 * emulator's streams, so it is recorded, not run, while the stream is captured into a graph. */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_set>

namespace blip2_sim { /* tests/cudasim/runtime.cpp */
bool device_accessible(const void *p);
bool device_range(const void *p, size_t bytes);
cudaError_t stream_enqueue(cudaStream_t stream, const char *what, std::function<void()> work, bool kernel);
} /* namespace blip2_sim */

struct cublasContext {
    cudaStream_t stream;
    cublasMath_t math;
    void *workspace; /* user-owned, for the record: the emulation needs none */
    size_t workspace_bytes;
};

struct cublasLtContext {
    int unused;
};

namespace {

/* ------------------------------------------------------------------------------------------------
 * Handles: the live ones are registered, so a NULL or destroyed handle is refused. */
std::mutex g_mu;
std::unordered_set<const void *> g_live;

void track(const void *h, bool on) {
    std::lock_guard<std::mutex> lock(g_mu);
    if (on) g_live.insert(h);
    else g_live.erase(h);
}

bool live(const void *h) {
    std::lock_guard<std::mutex> lock(g_mu);
    return h && g_live.count(h);
}

/* Says why a call is refused (one line on stderr) and returns false. */
bool fail(const char *fn, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bool fail(const char *fn, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cudasim: %s: ", fn);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return false;
}

/* ------------------------------------------------------------------------------------------------
 * Element types and conversions. */
int64_t elem_size(cudaDataType t) {
    return t == CUDA_R_32F ? 4 : (t == CUDA_R_16F || t == CUDA_R_16BF) ? 2 : 0;
}

/* A/B of type ab, C/D of type cd (fp32, or ab when 16-bit), fp32 compute: what the fake (and
 * cuBLAS, for these) supports. */
bool supported(cudaDataType ab, cudaDataType cd, cublasComputeType_t ct) {
    bool f32 = ct == CUBLAS_COMPUTE_32F || ct == CUBLAS_COMPUTE_32F_PEDANTIC;
    bool cd_ok = cd == CUDA_R_32F || (cd == ab && elem_size(ab) == 2);
    return cd_ok && elem_size(ab) && (f32 || (ct == CUBLAS_COMPUTE_32F_FAST_TF32 && ab == CUDA_R_32F));
}

bool op_ok(int32_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }

float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e == 0) return sign ? -std::ldexp((float)f, -24) : std::ldexp((float)f, -24); /* zero, subnormal */
    return from_bits(sign | (e == 31 ? 0x7f800000u : (e + 112) << 23) | f << 13);
}

float bf16_to_float(uint16_t h) { return from_bits((uint32_t)h << 16); }

/* fp32 to bf16 / half, rounded to nearest even (NaN stays NaN), as cuBLAS writes a 16-bit D. */
uint16_t float_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
uint16_t float_to_half(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: inf */
    if (a < 0x38800000u) { /* subnormal or zero: a multiple of 2^-24, rounded to nearest even */
        float f = std::fabs(x) * 16777216.0f; /* exact: a power of two */
        return (uint16_t)(sign | (uint32_t)std::nearbyint(f));
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1); /* round the 13 dropped bits to nearest even */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

/* Element i of a typed array as float; v stored into it (rounded when 16-bit). */
float load_as_float(const void *p, cudaDataType t, int64_t i) {
    if (t == CUDA_R_32F) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return t == CUDA_R_16F ? half_to_float(h) : bf16_to_float(h);
}
void store_from_float(void *p, cudaDataType t, int64_t i, float v) {
    if (t == CUDA_R_32F) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = t == CUDA_R_16F ? float_to_half(v) : float_to_bf16(v);
}

/* fp32 rounded to TF32 (10 mantissa bits, nearest even), as the tensor cores read it. */
float to_tf32(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;
    u += 0xfffu + ((u >> 13) & 1);
    return from_bits(u & ~0x1fffu);
}

/* Lowest set bit of the address, capped at 256 (NULL: 256), as cuBLASLt measures alignment. */
uint32_t align_of(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uintptr_t low = a & (~a + 1);
    return a == 0 || low >= 256 ? 256u : (uint32_t)low;
}

/* ------------------------------------------------------------------------------------------------
 * The computation, shared by the three gemm calls. A matrix as stored: rows × cols, column-major,
 * `stride` elements between the matrices of a batch. */
struct mat {
    const void *p;
    cudaDataType type;
    int64_t rows, cols, ld, stride;
};

/* Whether the whole batch of x lies inside one device allocation; says which matrix if not. */
bool in_device(const char *fn, const char *name, const mat &x, int64_t batch) {
    if (x.rows == 0 || x.cols == 0 || batch == 0) return true;
    int64_t es = elem_size(x.type), span = (x.cols - 1) * x.ld + x.rows, last = (batch - 1) * x.stride;
    int64_t lo = std::min<int64_t>(0, last), hi = std::max<int64_t>(0, last) + span;
    return blip2_sim::device_range((const void *)((uintptr_t)x.p + lo * es), (size_t)((hi - lo) * es)) ||
           fail(fn, "%s is not device memory", name);
}

/* Everything one call computes, by value: it may run later, and again at each graph replay. */
struct job {
    mat a, b, c, d; /* c is read only when beta != 0 */
    bool ta, tb, tf32, relu;
    int64_t m, n, k, batch;
    float alpha, beta;
    const void *bias; /* per row of D (of D's type), or NULL */
};

/* Matrix z of the batch x as packed doubles (rows × cols, leading dimension rows). */
void widen(const mat &x, int64_t z, bool tf32, double *out) {
    const char *base = (const char *)x.p + z * x.stride * elem_size(x.type);
    for (int64_t j = 0; j < x.cols; j++) {
        double *o = out + j * x.rows;
        if (x.type == CUDA_R_32F) {
            const float *s = (const float *)base + j * x.ld;
            for (int64_t i = 0; i < x.rows; i++) o[i] = tf32 ? to_tf32(s[i]) : s[i];
        } else {
            const uint16_t *s = (const uint16_t *)base + j * x.ld;
            bool h = x.type == CUDA_R_16F;
            for (int64_t i = 0; i < x.rows; i++) o[i] = h ? half_to_float(s[i]) : bf16_to_float(s[i]);
        }
    }
}

/* The products in double, rounded once: an element's value does not depend on the shape of the
 * call it is in (as fp32 sums in a shape-dependent order would), so the emulator's tests see the
 * kernels' own numerics, not OpenBLAS's blocking. */
void run(const job &g) {
    std::unique_ptr<double[]> a(new double[std::max<int64_t>(1, g.a.rows * g.a.cols)]);
    std::unique_ptr<double[]> b(new double[std::max<int64_t>(1, g.b.rows * g.b.cols)]);
    std::unique_ptr<double[]> t(new double[g.m * g.n]);
    for (int64_t z = 0; z < g.batch; z++) {
        std::fill(t.get(), t.get() + g.m * g.n, 0.0);
        if (g.k > 0) {
            widen(g.a, z, g.tf32, a.get());
            widen(g.b, z, g.tf32, b.get());
            cblas_dgemm(CblasColMajor, g.ta ? CblasTrans : CblasNoTrans, g.tb ? CblasTrans : CblasNoTrans, (blasint)g.m,
                        (blasint)g.n, (blasint)g.k, 1.0, a.get(), (blasint)std::max<int64_t>(1, g.a.rows), b.get(),
                        (blasint)std::max<int64_t>(1, g.b.rows), 0.0, t.get(), (blasint)g.m);
        }
        const bool c = g.beta != 0.0f;
        for (int64_t j = 0; j < g.n; j++)
            for (int64_t i = 0; i < g.m; i++) {
                float v = g.alpha * (float)t[i + j * g.m];
                if (c) v += g.beta * load_as_float(g.c.p, g.c.type, z * g.c.stride + i + j * g.c.ld);
                if (g.bias) v += load_as_float(g.bias, g.d.type, i);
                if (g.relu) v = std::fmax(v, 0.0f);
                store_from_float((void *)g.d.p, g.d.type, z * g.d.stride + i + j * g.d.ld, v);
            }
    }
}

cublasStatus_t enqueue(cudaStream_t stream, const char *fn, const job &g) {
    cudaError_t e = blip2_sim::stream_enqueue(stream, fn, [g] { run(g); }, true); /* a kernel: PDL may overlap it */
    return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

/* alpha/beta are host pointers (pointer mode host): read now, so replays see the call's values. */
bool read_scalar(const char *fn, const char *name, const void *p, float *out) {
    if (!p) return false;
    if (blip2_sim::device_range(p, sizeof(float)))
        return fail(fn, "%s is device memory but the pointer mode is host", name);
    memcpy(out, p, sizeof *out);
    return true;
}

/* cublasGemmEx and cublasGemmStridedBatchedEx (batch 1, strides 0 for the former). */
cublasStatus_t gemm_ex(const char *fn, cublasHandle_t h, cublasOperation_t transa, cublasOperation_t transb, int m,
                       int n, int k, const void *alpha, const void *A, cudaDataType at, int lda, long long sa,
                       const void *B, cudaDataType bt, int ldb, long long sb, const void *beta, void *C,
                       cudaDataType ct, int ldc, long long sc, int batch, cublasComputeType_t compute) {
    if (!live(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!op_ok(transa) || !op_ok(transb) || m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    job g{};
    g.ta = transa != CUBLAS_OP_N, g.tb = transb != CUBLAS_OP_N;
    g.a = {A, at, g.ta ? k : m, g.ta ? m : k, lda, sa};
    g.b = {B, bt, g.tb ? n : k, g.tb ? k : n, ldb, sb};
    g.c = {C, ct, m, n, ldc, sc};
    g.d = g.c;
    if (lda < std::max<int64_t>(1, g.a.rows) || ldb < std::max<int64_t>(1, g.b.rows) || ldc < std::max(1, m))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (at != bt || !supported(at, ct, compute)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (!read_scalar(fn, "alpha", alpha, &g.alpha) || !read_scalar(fn, "beta", beta, &g.beta))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    if (!in_device(fn, "A", g.a, batch) || !in_device(fn, "B", g.b, batch) || !in_device(fn, "C", g.c, batch))
        return CUBLAS_STATUS_INVALID_VALUE;
    cublasMath_t mode = (cublasMath_t)(h->math & ~CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    g.tf32 = compute == CUBLAS_COMPUTE_32F_FAST_TF32 ||
             (compute == CUBLAS_COMPUTE_32F && mode == CUBLAS_TF32_TENSOR_OP_MATH);
    g.m = m, g.n = n, g.k = k, g.batch = batch;
    return enqueue(h->stream, fn, g);
}

/* ------------------------------------------------------------------------------------------------
 * cuBLASLt descriptors: plain structs kept in the caller's opaque storage, marked as initialised. */
constexpr uint64_t DESC_MAGIC = 0x63736d4c74446573ull, LAYOUT_MAGIC = 0x63736d4c744c6179ull,
                   PREF_MAGIC = 0x63736d4c74507266ull, ALGO_MAGIC = 0x63736d4c74416c67ull;

struct desc_s {
    uint64_t magic;
    cublasComputeType_t compute;
    cudaDataType_t scale;
    int32_t ta, tb, bias_type;
    uint32_t epilogue;
    const void *bias;
};

struct layout_s {
    uint64_t magic;
    cudaDataType type;
    uint64_t rows, cols;
    int64_t ld;
};

struct pref_s {
    uint64_t magic, max_workspace;
    uint32_t align[4]; /* A, B, C, D */
    uint32_t reduction_mask; /* the split-K schemes allowed (the emulation never splits K) */
};

/* What the heuristic chose for (the alignments promised, the bias's then): matmul checks against it. */
struct algo_s {
    uint64_t magic;
    uint32_t align[4], bias_align;
    int32_t ab, compute;
    uint32_t epilogue;
    uint64_t workspace;
};

static_assert(sizeof(desc_s) <= sizeof(cublasLtMatmulDescOpaque_t), "desc_s does not fit");
static_assert(sizeof(layout_s) <= sizeof(cublasLtMatrixLayoutOpaque_t), "layout_s does not fit");
static_assert(sizeof(pref_s) <= sizeof(cublasLtMatmulPreferenceOpaque_t), "pref_s does not fit");
static_assert(sizeof(algo_s) <= sizeof(cublasLtMatmulAlgo_t), "algo_s does not fit");

template <typename T, typename O> void put(O *o, const T &v) {
    memset(o, 0, sizeof *o);
    memcpy(o, &v, sizeof v);
}

template <typename T, typename O> bool get(const O *o, uint64_t magic, T *v) {
    if (!o) return false;
    memcpy(v, o, sizeof *v);
    return v->magic == magic;
}

/* An attribute value of exactly its size. */
template <typename T> bool set_attr(T *field, const void *buf, size_t bytes) {
    if (bytes != sizeof *field) return false;
    memcpy(field, buf, sizeof *field);
    return true;
}

/* A checked cuBLASLt problem: D (m × n) = op(A) (m × k) · op(B) (k × n), C shaped as D. */
struct lt_problem {
    desc_s d;
    layout_s a, b, c, dd;
    int64_t m, n, k;
};

bool layout_ok(const layout_s &l) {
    const uint64_t lim = (uint64_t)1 << 31;
    return l.rows < lim && l.cols < lim && l.ld >= (int64_t)std::max<uint64_t>(1, l.rows) && l.ld < (int64_t)lim;
}

bool has_bias(uint32_t epi) { return epi == CUBLASLT_EPILOGUE_BIAS || epi == CUBLASLT_EPILOGUE_RELU_BIAS; }

cublasStatus_t lt_check(cublasLtHandle_t h, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t A,
                        cublasLtMatrixLayout_t B, cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D, lt_problem *p) {
    if (!live(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!get(desc, DESC_MAGIC, &p->d) || !get(A, LAYOUT_MAGIC, &p->a) || !get(B, LAYOUT_MAGIC, &p->b) ||
        !get(C, LAYOUT_MAGIC, &p->c) || !get(D, LAYOUT_MAGIC, &p->dd))
        return CUBLAS_STATUS_INVALID_VALUE;
    uint32_t epi = p->d.epilogue;
    bool epi_ok = epi == CUBLASLT_EPILOGUE_DEFAULT || epi == CUBLASLT_EPILOGUE_RELU || has_bias(epi);
    if (p->a.type != p->b.type || p->c.type != p->dd.type || p->d.scale != CUDA_R_32F ||
        !supported(p->a.type, p->dd.type, p->d.compute) || !epi_ok || (has_bias(epi) && p->d.bias_type != p->dd.type))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (!layout_ok(p->a) || !layout_ok(p->b) || !layout_ok(p->c) || !layout_ok(p->dd))
        return CUBLAS_STATUS_INVALID_VALUE;
    bool ta = p->d.ta != CUBLAS_OP_N, tb = p->d.tb != CUBLAS_OP_N;
    p->m = (int64_t)p->dd.rows, p->n = (int64_t)p->dd.cols, p->k = (int64_t)(ta ? p->a.rows : p->a.cols);
    uint64_t a_rows = ta ? p->a.cols : p->a.rows;
    uint64_t b_rows = tb ? p->b.cols : p->b.rows, b_cols = tb ? p->b.rows : p->b.cols;
    if ((int64_t)a_rows != p->m || (int64_t)b_rows != p->k || (int64_t)b_cols != p->n || p->c.rows != p->dd.rows ||
        p->c.cols != p->dd.cols)
        return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

/* The checks a chosen algorithm brings to cublasLtMatmul: same kind of problem, the workspace it
 * needs, and pointers at least as aligned as the preference (and the bias at heuristic time) said. */
bool algo_fits(const char *fn, const algo_s &al, const lt_problem &p, const void *const ptrs[4], size_t ws_bytes) {
    if (al.ab != (int32_t)p.a.type || al.compute != (int32_t)p.d.compute || al.epilogue != p.d.epilogue)
        return fail(fn, "algo was chosen for other types or another epilogue");
    if (ws_bytes < al.workspace) return fail(fn, "workspace smaller than the algo needs");
    static const char *const names[4] = {"A", "B", "C", "D"};
    for (int i = 0; i < 4; i++)
        if (align_of(ptrs[i]) < al.align[i])
            return fail(fn, "%s (%p) is less aligned than the %u bytes the preference promised", names[i], ptrs[i],
                        al.align[i]);
    if (has_bias(p.d.epilogue) && align_of(p.d.bias) < al.bias_align)
        return fail(fn, "bias (%p) is less aligned than when the algo was chosen (%u bytes)", p.d.bias, al.bias_align);
    return true;
}

bool workspace_ok(const char *fn, const void *ws, size_t bytes) {
    if (bytes == 0) return true;
    if (!blip2_sim::device_range(ws, bytes)) return fail(fn, "workspace is not device memory");
    return (uintptr_t)ws % 256 == 0 || fail(fn, "workspace (%p) is not 256-byte aligned", ws);
}

} /* namespace */

/* ------------------------------------------------------------------------------------------------
 * cuBLAS */
extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t *handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new cublasContext{nullptr, CUBLAS_DEFAULT_MATH, nullptr, 0};
    track(*handle, true);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    track(handle, false);
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t streamId) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = streamId;
    handle->workspace = nullptr, handle->workspace_bytes = 0; /* as documented: back to the default pool */
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    int base = mode & ~CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION; /* one of the enum's modes */
    if (base < CUBLAS_DEFAULT_MATH ||
        (base > CUBLAS_FP32_EMULATED_BF16X9_MATH && base != CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH))
        return CUBLAS_STATUS_INVALID_VALUE;
    handle->math = mode;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void *workspace, size_t workspaceSizeInBytes) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!workspace_ok("cublasSetWorkspace", workspace, workspaceSizeInBytes)) return CUBLAS_STATUS_INVALID_VALUE;
    handle->workspace = workspace, handle->workspace_bytes = workspaceSizeInBytes;
    return CUBLAS_STATUS_SUCCESS;
}

const char *cublasGetStatusName(cublasStatus_t status) {
    switch (status) {
#define NAME(s) \
    case s: return #s;
        NAME(CUBLAS_STATUS_SUCCESS)
        NAME(CUBLAS_STATUS_NOT_INITIALIZED)
        NAME(CUBLAS_STATUS_ALLOC_FAILED)
        NAME(CUBLAS_STATUS_INVALID_VALUE)
        NAME(CUBLAS_STATUS_ARCH_MISMATCH)
        NAME(CUBLAS_STATUS_MAPPING_ERROR)
        NAME(CUBLAS_STATUS_EXECUTION_FAILED)
        NAME(CUBLAS_STATUS_INTERNAL_ERROR)
        NAME(CUBLAS_STATUS_NOT_SUPPORTED)
        NAME(CUBLAS_STATUS_LICENSE_ERROR)
#undef NAME
    }
    return nullptr;
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void *alpha, const void *A, cudaDataType Atype, int lda, const void *B,
                            cudaDataType Btype, int ldb, const void *beta, void *C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    (void)algo;
    return gemm_ex("cublasGemmEx", handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype, ldb, 0, beta,
                   C, Ctype, ldc, 0, 1, computeType);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void *alpha, const void *A, cudaDataType Atype,
                                          int lda, long long int strideA, const void *B, cudaDataType Btype, int ldb,
                                          long long int strideB, const void *beta, void *C, cudaDataType Ctype,
                                          int ldc, long long int strideC, int batchCount,
                                          cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    (void)algo;
    return gemm_ex("cublasGemmStridedBatchedEx", handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B,
                   Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType);
}

/* ------------------------------------------------------------------------------------------------
 * cuBLASLt */
cublasStatus_t cublasLtCreate(cublasLtHandle_t *lightHandle) {
    if (!lightHandle) return CUBLAS_STATUS_INVALID_VALUE;
    *lightHandle = new cublasLtContext{0};
    track(*lightHandle, true);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t lightHandle) {
    if (!live(lightHandle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    track(lightHandle, false);
    delete lightHandle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescInit_internal(cublasLtMatmulDesc_t matmulDesc, size_t size,
                                               cublasComputeType_t computeType, cudaDataType_t scaleType) {
    if (!matmulDesc) return CUBLAS_STATUS_INVALID_VALUE;
    if (size < sizeof(cublasLtMatmulDescOpaque_t)) return CUBLAS_STATUS_ALLOC_FAILED;
    put(matmulDesc, desc_s{DESC_MAGIC, computeType, scaleType, CUBLAS_OP_N, CUBLAS_OP_N, CUDA_R_32F,
                           CUBLASLT_EPILOGUE_DEFAULT, nullptr});
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t matmulDesc, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t sizeInBytes) {
    desc_s d;
    if (!get(matmulDesc, DESC_MAGIC, &d) || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    bool ok = false;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: ok = set_attr(&d.ta, buf, sizeInBytes) && op_ok(d.ta); break;
    case CUBLASLT_MATMUL_DESC_TRANSB: ok = set_attr(&d.tb, buf, sizeInBytes) && op_ok(d.tb); break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE: ok = set_attr(&d.epilogue, buf, sizeInBytes); break; /* checked at use */
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: ok = set_attr(&d.bias, buf, sizeInBytes); break;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: ok = set_attr(&d.bias_type, buf, sizeInBytes); break;
    default: break; /* not emulated */
    }
    if (!ok) return CUBLAS_STATUS_INVALID_VALUE;
    put(matmulDesc, d);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutInit_internal(cublasLtMatrixLayout_t matLayout, size_t size, cudaDataType type,
                                                 uint64_t rows, uint64_t cols, int64_t ld) {
    if (!matLayout) return CUBLAS_STATUS_INVALID_VALUE;
    if (size < sizeof(cublasLtMatrixLayoutOpaque_t)) return CUBLAS_STATUS_ALLOC_FAILED;
    put(matLayout, layout_s{LAYOUT_MAGIC, type, rows, cols, ld});
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceInit_internal(cublasLtMatmulPreference_t pref, size_t size) {
    if (!pref) return CUBLAS_STATUS_INVALID_VALUE;
    if (size < sizeof(cublasLtMatmulPreferenceOpaque_t)) return CUBLAS_STATUS_ALLOC_FAILED;
    put(pref, pref_s{PREF_MAGIC, 0, {256, 256, 256, 256}, CUBLASLT_REDUCTION_SCHEME_MASK}); /* the documented defaults */
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
                                                    size_t sizeInBytes) {
    pref_s p;
    if (!get(pref, PREF_MAGIC, &p) || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    bool ok = false;
    switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: ok = set_attr(&p.max_workspace, buf, sizeInBytes); break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
        ok = set_attr(&p.align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, sizeInBytes);
        break;
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK:
        ok = set_attr(&p.reduction_mask, buf, sizeInBytes) && (p.reduction_mask & ~CUBLASLT_REDUCTION_SCHEME_MASK) == 0;
        break;
    default: break; /* not emulated */
    }
    if (!ok) return CUBLAS_STATUS_INVALID_VALUE;
    put(pref, p);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t operationDesc,
                                              cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                              cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                              cublasLtMatmulPreference_t preference, int requestedAlgoCount,
                                              cublasLtMatmulHeuristicResult_t heuristicResultsArray[],
                                              int *returnAlgoCount) {
    if (returnAlgoCount) *returnAlgoCount = 0;
    pref_s pr;
    if (requestedAlgoCount <= 0 || !heuristicResultsArray || !returnAlgoCount || !get(preference, PREF_MAGIC, &pr))
        return CUBLAS_STATUS_INVALID_VALUE;
    lt_problem p;
    cublasStatus_t st = lt_check(lightHandle, operationDesc, Adesc, Bdesc, Cdesc, Ddesc, &p);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    algo_s al{ALGO_MAGIC, {pr.align[0], pr.align[1], pr.align[2], pr.align[3]}, 0, (int32_t)p.a.type,
              (int32_t)p.d.compute, p.d.epilogue, 0};
    al.bias_align = has_bias(p.d.epilogue) ? align_of(p.d.bias) : 0; /* it reads the pointer's alignment */
    cublasLtMatmulHeuristicResult_t *r = &heuristicResultsArray[0];
    memset(r, 0, sizeof *r);
    put(&r->algo, al);
    r->workspaceSize = al.workspace;
    r->state = CUBLAS_STATUS_SUCCESS;
    r->wavesCount = 1.0f;
    *returnAlgoCount = 1;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t computeDesc, const void *alpha,
                              const void *A, cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc,
                              const void *beta, const void *C, cublasLtMatrixLayout_t Cdesc, void *D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t *algo, void *workspace,
                              size_t workspaceSizeInBytes, cudaStream_t stream) {
    const char *fn = "cublasLtMatmul";
    lt_problem p;
    cublasStatus_t st = lt_check(lightHandle, computeDesc, Adesc, Bdesc, Cdesc, Ddesc, &p);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    algo_s al{};
    const void *const ptrs[4] = {A, B, C, D};
    if (algo && !get(algo, ALGO_MAGIC, &al)) /* NULL: the library's own implicit heuristic */
        return fail(fn, "algo did not come from cublasLtMatmulAlgoGetHeuristic"), CUBLAS_STATUS_INVALID_VALUE;
    if (algo && !algo_fits(fn, al, p, ptrs, workspaceSizeInBytes)) return CUBLAS_STATUS_INVALID_VALUE;
    job g{};
    if (!read_scalar(fn, "alpha", alpha, &g.alpha) || !read_scalar(fn, "beta", beta, &g.beta) ||
        !workspace_ok(fn, workspace, workspaceSizeInBytes))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (C == D && p.c.ld != p.dd.ld)
        return fail(fn, "in place (C == D) with different leading dimensions"), CUBLAS_STATUS_INVALID_VALUE;
    g.ta = p.d.ta != CUBLAS_OP_N, g.tb = p.d.tb != CUBLAS_OP_N;
    g.a = {A, p.a.type, (int64_t)p.a.rows, (int64_t)p.a.cols, p.a.ld, 0};
    g.b = {B, p.b.type, (int64_t)p.b.rows, (int64_t)p.b.cols, p.b.ld, 0};
    g.c = {C, p.c.type, p.m, p.n, p.c.ld, 0};
    g.d = {D, p.dd.type, p.m, p.n, p.dd.ld, 0};
    g.m = p.m, g.n = p.n, g.k = p.k, g.batch = 1;
    g.tf32 = p.d.compute == CUBLAS_COMPUTE_32F_FAST_TF32;
    g.relu = p.d.epilogue == CUBLASLT_EPILOGUE_RELU || p.d.epilogue == CUBLASLT_EPILOGUE_RELU_BIAS;
    g.bias = has_bias(p.d.epilogue) ? p.d.bias : nullptr; /* of D's type (lt_check) */
    if (g.m == 0 || g.n == 0) return CUBLAS_STATUS_SUCCESS;
    mat bias{p.d.bias, p.dd.type, g.m, 1, g.m, 0};
    if (!in_device(fn, "A", g.a, 1) || !in_device(fn, "B", g.b, 1) || (g.beta != 0.0f && !in_device(fn, "C", g.c, 1)) ||
        !in_device(fn, "D", g.d, 1) || (has_bias(p.d.epilogue) && !in_device(fn, "bias", bias, 1)))
        return CUBLAS_STATUS_INVALID_VALUE;
    return enqueue(stream, fn, g);
}

} /* extern "C" */

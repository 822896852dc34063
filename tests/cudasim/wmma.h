/* nvcuda::wmma (CUDA's warp matrix multiply-accumulate API, <mma.h>) on the CPU emulator, so that
 * kernels using the tensor cores through it build and run here like every other kernel. Included
 * by prelude.h; in host mode NVIDIA's <mma.h> declares nothing, so there is no clash.
 *
 * The API leaves a fragment's layout across the warp's lanes unspecified, so here every lane holds
 * the whole tile (row-major in x[]): each lane's load, fill, mma and store is the warp's whole
 * collective operation, and code that treats x[0 .. num_elements) as opaque elements (scaling,
 * conversions) works unchanged. Products are the hardware's: half and bf16 inputs exact, tf32
 * inputs cut to their 10-bit mantissa, fp32 accumulation (in K order here, which differs from the
 * tensor cores' order below fp32 rounding). A store waits for the warp's other lanes, so a tile
 * read, updated and written back is read by all of them first, as on the device. Shapes:
 * m16n16k16, m32n8k16, m8n32k16 for half/bf16, m16n16k8 for tf32, as on sm_80+. */
#ifndef BLIP2_CUDASIM_WMMA_H
#define BLIP2_CUDASIM_WMMA_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "sim.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}

namespace detail {
template <typename Use, int M, int N, int K> struct dims;
template <int M, int N, int K> struct dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };
template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };
template <typename T> struct is_tf32 { static constexpr bool value = false; };
template <> struct is_tf32<precision::tf32> { static constexpr bool value = true; };

template <typename Use, int M, int N, int K, typename T> constexpr bool valid_shape() {
    bool k16 = (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) || (M == 8 && N == 32 && K == 16);
    bool k8 = M == 16 && N == 16 && K == 8;
    return std::is_same<Use, accumulator>::value ? k16 || k8 : is_tf32<T>::value ? k8 : k16;
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename E> inline E from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline __half from_float<__half>(float v) { return __float2half_rn(v); }

inline float tf32_cut(float v) { /* what the tensor cores read of an fp32 value: sign, exponent, 10 bits */
    uint32_t u;
    memcpy(&u, &v, 4);
    u &= 0xffffe000u;
    memcpy(&v, &u, 4);
    return v;
}
} // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static_assert(detail::valid_shape<Use, M, N, K, T>(), "wmma: no such shape for this type");
    using element_type = typename detail::storage<T>::type;
    static constexpr int rows = detail::dims<Use, M, N, K>::rows, cols = detail::dims<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    element_type x[num_elements];
};

/* tf32 conversion, round to nearest (ties away, as cvt.rna.tf32.f32). */
inline float __float_to_tf32(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    memcpy(&v, &u, 4);
    return v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout> &f, const V &v) {
    for (int i = 0; i < f.num_elements; i++) f.x[i] = (typename fragment<Use, M, N, K, T, Layout>::element_type)v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout> &f, const P *p, unsigned ldm) {
    static_assert(!std::is_same<Layout, void>::value, "wmma: a matrix_a/matrix_b fragment names its layout");
    constexpr bool row = std::is_same<Layout, row_major>::value;
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++) f.x[r * f.cols + c] = p[row ? (size_t)r * ldm + c : (size_t)c * ldm + r];
}

template <int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T> &f, const P *p, unsigned ldm, layout_t layout) {
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++)
            f.x[r * f.cols + c] = p[layout == mem_row_major ? (size_t)r * ldm + c : (size_t)c * ldm + r];
}

/* Every lane has loaded before any lane stores (a warp barrier: the emulator's shuffle rendezvous,
 * which also reports a warp whose lanes do not all arrive). */
template <int M, int N, int K, typename T, typename P>
inline void store_matrix_sync(P *p, const fragment<accumulator, M, N, K, T> &f, unsigned ldm, layout_t layout) {
    blip2_sim::shuffle_xor(0xffffffffu, 0, 0, 32);
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++)
            p[layout == mem_row_major ? (size_t)r * ldm + c : (size_t)c * ldm + r] = f.x[r * f.cols + c];
}

/* d = a·b + c; d may be c. Every lane of a warp asks for the same products in the same order, and
 * lanes run one after another between warp rendezvous: a lane's n-th product is kept with its
 * operands in slot n of a ring, and a later lane whose n-th operands match takes it, so a warp's
 * mma costs one product and 31 comparisons. */
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC> &d, const fragment<matrix_a, M, N, K, TA, LA> &a,
                     const fragment<matrix_b, M, N, K, TB, LB> &b, const fragment<accumulator, M, N, K, TC> &c) {
    static_assert(std::is_same<TA, TB>::value, "wmma: a and b of one type");
    using FA = fragment<matrix_a, M, N, K, TA, LA>;
    using FB = fragment<matrix_b, M, N, K, TB, LB>;
    using FC = fragment<accumulator, M, N, K, TC>;
    struct memo {
        bool valid;
        FA a;
        FB b;
        FC c, d;
    };
    static thread_local memo ring[64];
    static thread_local unsigned calls[1024]; /* per thread of the block */
    const blip2_sim::thread_coords *t = blip2_sim::current();
    memo &last = ring[calls[t->thread_idx.x + t->block_dim.x * (t->thread_idx.y + t->block_dim.y * t->thread_idx.z)]++ % 64];
    if (last.valid && !memcmp(&last.a, &a, sizeof a) && !memcmp(&last.b, &b, sizeof b) && !memcmp(&last.c, &c, sizeof c)) {
        d = last.d;
        return;
    }
    last.valid = true, last.a = a, last.b = b, last.c = c;
    constexpr bool tf32 = detail::is_tf32<TA>::value;
    float out[M * N];
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float s = detail::to_float(c.x[m * N + n]);
            for (int k = 0; k < K; k++) {
                float av = detail::to_float(a.x[m * K + k]), bv = detail::to_float(b.x[k * N + n]);
                if (tf32) av = detail::tf32_cut(av), bv = detail::tf32_cut(bv);
                s += av * bv;
            }
            out[m * N + n] = s;
        }
    for (int i = 0; i < M * N; i++) last.d.x[i] = detail::from_float<typename FC::element_type>(out[i]);
    d = last.d;
}

} // namespace wmma
} // namespace nvcuda

#endif

/* What the encoders' two tensor-core attention kernels share (attention_mma.cu: fp32 or 16-bit io
 * staged through registers; attention_fa.cu: 16-bit io by cp.async and ldmatrix): a warp's 16
 * query rows against NT·8 keys a tile, S in mma.sync C fragments, the online softmax in base 2. */
#ifndef BLIP2_ATTENTION_TILE_CUH
#define BLIP2_ATTENTION_TILE_CUH

#include <math.h>

#include "internal.cuh"

/* 2^x: the SFU's approximation (relative error ~2^-22, subnormal results flushed), not exp2f's
 * subnormal handling, which cost 4 more instructions per score. */
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return exp2f(x);
#endif
}

/* The sum of the two values of a pack2 register. */
template <typename T> __device__ __forceinline__ float sum2(unsigned u) {
    float lo, hi;
    widen2<T>(u, lo, hi);
    return lo + hi;
}

/* The softmax state of the lane's two rows (g and g + 8 of the warp's 16), in base 2: running max m
 * (of the scores as given, before qscale), the lane's share of the running sum l (the quad's four
 * shares add up at the end), O [dims/8][4]. */
template <int KC> struct softmax_rows {
    float m[2], l[2];
    float o[2 * KC][4];
};

/* The state before the first tile: no max yet, nothing summed. */
template <int KC> __device__ __forceinline__ void softmax_rows_init(softmax_rows<KC> &st) {
    st.m[0] = st.m[1] = -INFINITY, st.l[0] = st.l[1] = 0.0f;
#pragma unroll
    for (int d = 0; d < 2 * KC; d++) st.o[d][0] = st.o[d][1] = st.o[d][2] = st.o[d][3] = 0.0f;
}

/* The online softmax update for one tile of NT 8-key groups, kn of its keys real (the rest masked);
 * the scores are s·qscale (qscale = 1 where q came scaled). P [8-key group][row g, g+8] packed as
 * A-fragment halves; l sums P as rounded, so the weights that multiply v add up to the divisor. */
template <typename T, int KC, int NT>
__device__ __forceinline__ void softmax_update(unsigned (&p)[NT][2], float (&s)[NT][4], softmax_rows<KC> &st, int kn,
                                               float qscale) {
    const int t = (int)threadIdx.x & 3;
    if (kn < 8 * NT)
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (n * 8 + 2 * t + (i & 1) >= kn) s[n][i] = -INFINITY;
    float mx[2] = {st.m[0], st.m[1]};
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) mx[i >> 1] = fmaxf(mx[i >> 1], s[n][i]);
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; r++) { /* the row's max over its quad; alpha rescales what came before */
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        base[r] = mx[r] == -INFINITY ? 0.0f : mx[r] * qscale;
        const float alpha = fast_exp2(st.m[r] * qscale - base[r]); /* m = -inf at first: 0 */
        st.m[r] = mx[r];
        st.l[r] *= alpha;
#pragma unroll
        for (int d = 0; d < 2 * KC; d++) st.o[d][2 * r] *= alpha, st.o[d][2 * r + 1] *= alpha;
    }
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            p[n][r] = pack2<T>(fast_exp2(fmaf(s[n][2 * r], qscale, -base[r])),
                               fast_exp2(fmaf(s[n][2 * r + 1], qscale, -base[r])));
            st.l[r] += sum2<T>(p[n][r]);
        }
}

/* The lane's rows of O / l that exist (r0 + g, r0 + g + 8 below Tq): the quad's shares of l summed,
 * then put(row, col, o_col, o_col+1) for each of the lane's dim pairs col = 8d + 2t (d < 2·KC; the
 * caller bounds col by HS). */
template <int KC, typename Put>
__device__ __forceinline__ void softmax_rows_out(softmax_rows<KC> &st, int r0, int Tq, Put put) {
    const int lane = (int)threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = st.l[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = r0 + g + 8 * r;
        if (row >= Tq) continue;
        const float inv = 1.0f / l;
#pragma unroll
        for (int d = 0; d < 2 * KC; d++) put(row, d * 8 + 2 * t, st.o[d][2 * r] * inv, st.o[d][2 * r + 1] * inv);
    }
}

#endif

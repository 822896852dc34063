/* mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 and ldmatrix.sync.aligned.m8n8.x4
 * on the CPU emulator: what kernels/cuda/internal.cuh's mma_16816 and ldmatrix_x4 run here instead
 * of their inline PTX. Included by prelude.h.
 *
 * Unlike WMMA, this instruction fixes which lane holds which element (PTX ISA, "Matrix Fragments
 * for mma.m16n8k16 with floating point type"; g = lane / 4, t = lane % 4):
 *   A [16×16] row-major, four registers of two elements (the lower column in the low 16 bits):
 *     a0 (row g, cols 2t, 2t+1), a1 (row g+8, cols 2t, 2t+1), a2 (row g, cols 2t+8, 2t+9),
 *     a3 (row g+8, cols 2t+8, 2t+9);
 *   B [16×8] column-major: b0 (rows k = 2t, 2t+1 of column n = g), b1 (k = 2t+8, 2t+9);
 *   C, D [16×8] fp32: d0, d1 (row g, cols 2t, 2t+1), d2, d3 (row g+8, cols 2t, 2t+1).
 * Each lane writes its elements of A and B to its warp's exchange buffer, waits for the warp (the
 * shuffle rendezvous: a lane that does not come is reported, as an mma some lanes skip hangs or
 * gives garbage on a GPU), computes its own four sums from the whole tiles, and waits again so
 * that no lane refills the buffer while another still reads it. Products are exact (16-bit
 * inputs), sums fp32 in k order after the accumulator (the tensor cores' order and internal
 * precision differ below fp32 rounding). */
#ifndef BLIP2_CUDASIM_MMA_SYNC_H
#define BLIP2_CUDASIM_MMA_SYNC_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "sim.h"

namespace blip2_sim {

namespace mma_detail {
template <typename T> inline float lane_value(unsigned reg, int hi) {
    static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "mma: f16 or bf16");
    const unsigned short bits = (unsigned short)(hi ? reg >> 16 : reg & 0xffffu);
    if constexpr (std::is_same<T, __half>::value) {
        __half_raw r;
        r.x = bits;
        return __half2float(__half(r));
    } else {
        __nv_bfloat16_raw r;
        r.x = bits;
        return __bfloat162float(__nv_bfloat16(r));
    }
}
struct exchange { /* one warp's operands */
    float a[16][16], b[16][8];
};
} // namespace mma_detail

template <typename T> inline void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    static thread_local mma_detail::exchange buf[32]; /* per warp of the block (blocks run one at a time) */
    const thread_coords *c = current();
    const unsigned tid = c->thread_idx.x + c->block_dim.x * (c->thread_idx.y + c->block_dim.y * c->thread_idx.z);
    const int lane = (int)(tid & 31), g = lane >> 2, t = lane & 3;
    mma_detail::exchange &x = buf[tid / 32];
    for (int r = 0; r < 4; r++)
        for (int h = 0; h < 2; h++) x.a[g + 8 * (r & 1)][2 * t + 8 * (r >> 1) + h] = mma_detail::lane_value<T>(a[r], h);
    for (int r = 0; r < 2; r++)
        for (int h = 0; h < 2; h++) x.b[2 * t + 8 * r + h][g] = mma_detail::lane_value<T>(b[r], h);
    shuffle_xor(0xffffffffu, 0, 0, 32); /* every lane's operands are in */
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float s = d[i];
        for (int k = 0; k < 16; k++) s += x.a[row][k] * x.b[k][col];
        d[i] = s;
    }
    shuffle_xor(0xffffffffu, 0, 0, 32); /* every lane has read them */
}

/* ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (internal.cuh's ldmatrix_x4): lane l offers the
 * address of row l % 8 of matrix l / 8; after the warp's rendezvous each lane takes, of matrix i,
 * (row l / 4, cols 2(l % 4), 2(l % 4) + 1) into r[i], or with trans (rows 2(l % 4), 2(l % 4) + 1;
 * col l / 4), the lower index in the low half; a second rendezvous before the addresses are
 * reused. A row address that is not 16-byte aligned is a fault on a GPU: reported, and the process
 * stops. */
inline void ldmatrix_x4(unsigned (&r)[4], const void *row, bool trans) {
    static thread_local const unsigned char *addr[32][32]; /* [warp][lane] */
    const thread_coords *c = current();
    const unsigned tid = c->thread_idx.x + c->block_dim.x * (c->thread_idx.y + c->block_dim.y * c->thread_idx.z);
    const int lane = (int)(tid & 31), w = (int)(tid / 32);
    if ((uintptr_t)row % 16) {
        fprintf(stderr, "cudasim: ldmatrix: lane %d's row address %p is not 16-byte aligned\n", lane, row);
        abort();
    }
    addr[w][lane] = (const unsigned char *)row;
    shuffle_xor(0xffffffffu, 0, 0, 32); /* every lane's address is in */
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; i++) {
        uint16_t lo, hi;
        if (!trans) {
            memcpy(&lo, addr[w][8 * i + g] + 4 * t, 2);
            memcpy(&hi, addr[w][8 * i + g] + 4 * t + 2, 2);
        } else {
            memcpy(&lo, addr[w][8 * i + 2 * t] + 2 * g, 2);
            memcpy(&hi, addr[w][8 * i + 2 * t + 1] + 2 * g, 2);
        }
        r[i] = (unsigned)lo | (unsigned)hi << 16;
    }
    shuffle_xor(0xffffffffu, 0, 0, 32); /* every lane has read them */
}

} /* namespace blip2_sim */

#endif

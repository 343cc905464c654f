/* Projections of a few rows against weights kept in GGUF's block formats (l3/engine/packed.py): y = x W^T for
   W (N rows of K) stored as Q4_1 blocks (per 32 weights: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit codes q;
   the weight is d q + m) or Q8_0 blocks (per 32: fp16 d, 32 int8 q; the weight is d q). Each weight is rebuilt in
   fp32 exactly as gguf-py's dequantizer computes it (d q is exact in fp32, so one rounding of d q + m either way),
   so every product is the one the dequantized fp32 model makes; only the order of the sums differs. A weight
   takes 0.625 (Q4_1) or 1.06 (Q8_0) bytes instead of fp32's 4, so a decode step streams a sixth of the bytes.
   AVX-512 (16 weights a vector); the library is built for AVX2, so these functions carry their own target and
   run only where the CPU has AVX-512F (host_kernel.packed_available). */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32     /* weights per block */
#define MAX_X 8   /* rows of x per pass over a weight row (their sums stay in registers) */

#define TARGET __attribute__((target("avx512f,f16c,fma")))

/* The fp16 pair at p (d, then m for Q4_1) as fp32 lanes 0 and 1. */
TARGET static inline __m128 half_pair(const uint8_t *p) {
    int32_t bits;
    memcpy(&bits, p, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
}

/* One Q4_1 block's 32 weights: codes 0..15 in the low nibbles of its 16 bytes, 16..31 in the high ones. */
TARGET static inline void q4_1_block(const uint8_t *p, __m512 *w0, __m512 *w1) {
    __m128 dm = half_pair(p);
    __m512 d = _mm512_broadcastss_ps(dm), m = _mm512_broadcastss_ps(_mm_shuffle_ps(dm, dm, 1));
    __m128i raw = _mm_loadu_si128((const __m128i *)(p + 4)), low = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    *w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, m);
    *w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, m);
}

/* One Q8_0 block's 32 weights. */
TARGET static inline void q8_0_block(const uint8_t *p, __m512 *w0, __m512 *w1) {
    __m512 d = _mm512_broadcastss_ps(half_pair(p));
    __m128i a = _mm_loadu_si128((const __m128i *)(p + 2)), b = _mm_loadu_si128((const __m128i *)(p + 18));
    *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), d);
    *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d);
}

/* y[r, n + i] = W[n + i, :] . x[r, :] for r < M, i < TWO (1 or 2 weight rows from a; the second at b): each
   weight block rebuilt once for all M rows of x, each x vector loaded once for both weight rows. M, TWO and KIND
   are constants where it is called (the compiler then keeps the 2 M sums in registers). Every sum adds its
   block's two products in block order, whatever M and TWO: a row's result does not depend on its batch. */
TARGET static inline __attribute__((always_inline)) void tile(const uint8_t *a, const uint8_t *b, const int KIND,
                                                              long blocks, const float *x, long K, const int M,
                                                              const int TWO, float *y, long N) {
    const long bb = KIND == 0 ? 20 : 34;
    __m512 sa[MAX_X], sb[MAX_X];
    for (int r = 0; r < M; r++) sa[r] = sb[r] = _mm512_setzero_ps();
    for (long j = 0; j < blocks; j++) {
        __m512 a0, a1, b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
        if (KIND == 0) q4_1_block(a + j * bb, &a0, &a1); else q8_0_block(a + j * bb, &a0, &a1);
        if (TWO == 2) { if (KIND == 0) q4_1_block(b + j * bb, &b0, &b1); else q8_0_block(b + j * bb, &b0, &b1); }
        const float *xj = x + j * QK;
        for (int r = 0; r < M; r++) {
            __m512 x0 = _mm512_loadu_ps(xj + r * K), x1 = _mm512_loadu_ps(xj + r * K + 16);
            sa[r] = _mm512_fmadd_ps(a1, x1, _mm512_fmadd_ps(a0, x0, sa[r]));
            if (TWO == 2) sb[r] = _mm512_fmadd_ps(b1, x1, _mm512_fmadd_ps(b0, x0, sb[r]));
        }
    }
    for (int r = 0; r < M; r++) {
        y[r * N] = _mm512_reduce_add_ps(sa[r]);
        if (TWO == 2) y[r * N + 1] = _mm512_reduce_add_ps(sb[r]);
    }
}

#define TILE_M(KIND, TWO, M) \
    case M: tile(a, b, KIND, blocks, xr, K, M, TWO, yr, N); break;
#define TILES(KIND, TWO) \
    switch (m) { TILE_M(KIND, TWO, 1) TILE_M(KIND, TWO, 2) TILE_M(KIND, TWO, 3) TILE_M(KIND, TWO, 4) \
                 TILE_M(KIND, TWO, 5) TILE_M(KIND, TWO, 6) TILE_M(KIND, TWO, 7) TILE_M(KIND, TWO, 8) }

/* y[r, n] = W[n, :] . x[r, :] for r < rows and n0 <= n < n1; W rows of `row_bytes` bytes of blocks, x rows of K
   floats, y rows of N floats. kind 0: Q4_1 (20-byte blocks), 1: Q8_0 (34-byte blocks). Weight rows go two at a
   time against every MAX_X rows of x in turn. */
TARGET static void packed_rows(const uint8_t *w, int kind, long row_bytes, long K, const float *x, int rows,
                               float *y, long N, long n0, long n1) {
    const long blocks = K / QK;
    for (int r0 = 0; r0 < rows; r0 += MAX_X) {  /* a chunk of x stays in L1 while the weight rows stream past */
        const int m = rows - r0 < MAX_X ? rows - r0 : MAX_X;
        const float *xr = x + r0 * K;
        for (long n = n0; n < n1; n += 2) {
            const uint8_t *a = w + n * row_bytes, *b = a + row_bytes;
            const int two = n + 1 < n1;
            float *yr = y + r0 * N + n;
            if (kind == 0) { if (two) { TILES(0, 2) } else { TILES(0, 1) } }
            else { if (two) { TILES(1, 2) } else { TILES(1, 1) } }
        }
    }
}

/* The rows n0 <= n < n1 as above, split over `threads` OpenMP threads in even runs (the library is linked with
   -fopenmp where the compiler has it, and then shares the process's OpenMP runtime, PyTorch's, whose threads
   wait between parallel regions; without it, one thread). */
TARGET void l3_gemv_packed(const uint8_t *w, int kind, long row_bytes, long K, const float *x, int rows, float *y,
                           long N, long n0, long n1, int threads) {
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            long t = omp_get_thread_num(), T = omp_get_num_threads(), span = n1 - n0;
            long a = n0 + span * t / T / 2 * 2, b = t + 1 == T ? n1 : n0 + span * (t + 1) / T / 2 * 2;
            packed_rows(w, kind, row_bytes, K, x, rows, y, N, a, b);
        }
        return;
    }
#endif
    (void)threads;
    packed_rows(w, kind, row_bytes, K, x, rows, y, N, n0, n1);
}

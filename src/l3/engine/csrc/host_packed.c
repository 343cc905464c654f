/* Projections of a few rows against weights from GGUF's block formats (l3/engine/packed.py): y = x W^T for
   W (N rows of K) from Q4_1 blocks (per 32 weights: scale d, minimum m, 4-bit codes q; the weight is d q + m) or
   Q8_0 blocks (per 32: scale d, int8 codes q; the weight is d q). The blocks come apart in two arrays: the codes
   (16 or 32 bytes a block) and the scales as fp32 (d, m or d a block: the file's fp16 values, exact), which the
   kernel broadcasts straight from memory instead of converting and shuffling fp16 pairs in registers. Each
   weight is rebuilt in fp32 exactly as gguf-py's dequantizer computes it (d q is exact in fp32, so one rounding
   of d q + m either way), so every product is the one the dequantized fp32 model makes; only the order of the
   sums differs. A weight takes 0.75 (Q4_1) or 1.125 (Q8_0) bytes instead of fp32's 4.
   AVX-512 (16 weights a vector); the library is built for AVX2, so these functions carry their own target and
   run only where the CPU has AVX-512F (host_kernel.packed_available). */
#include <immintrin.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32     /* weights per block */
#define CODE_BYTES(KIND) ((KIND) == 0 ? 16 : 32)  /* a block's code bytes: Q4_1 (kind 0), Q8_0 (kind 1) */
#define SCALES(KIND) ((KIND) == 0 ? 2 : 1)        /* a block's fp32 scales: (d, m) for Q4_1, d for Q8_0 */
#define MAX_X 8   /* rows of x per pass over a weight row (their sums stay in registers) */

#define TARGET __attribute__((target("avx512f,fma")))

/* One Q4_1 block's 32 weights from its 16 code bytes c (codes 0..15 in the low nibbles, 16..31 in the high
   ones) and its scales s = (d, m). */
TARGET static inline void q4_1_block(const uint8_t *c, const float *s, __m512 *w0, __m512 *w1) {
    __m512 d = _mm512_set1_ps(s[0]), m = _mm512_set1_ps(s[1]);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
    *w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))), d, m);
    *w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), d, m);
}

/* One Q8_0 block's 32 weights from its 32 code bytes c and its scale s = (d). */
TARGET static inline void q8_0_block(const uint8_t *c, const float *s, __m512 *w0, __m512 *w1) {
    __m512 d = _mm512_set1_ps(s[0]);
    __m128i a = _mm_loadu_si128((const __m128i *)c), b = _mm_loadu_si128((const __m128i *)(c + 16));
    *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), d);
    *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d);
}

/* y[r, n + i] = W[n + i, :] . x[r, :] for r < M, i < TWO (1 or 2 weight rows: codes at a and b, scales at da
   and db): each weight block rebuilt once for all M rows of x, each x vector loaded once for both weight rows.
   M, TWO and KIND are constants where it is called (the compiler then keeps the 2 M sums in registers). Every
   sum adds its block's two products in block order, whatever M and TWO: a row's result does not depend on its
   batch. */
TARGET static inline __attribute__((always_inline)) void tile(const uint8_t *a, const uint8_t *b, const float *da,
                                                              const float *db, const int KIND, long blocks,
                                                              const float *x, long K, const int M, const int TWO,
                                                              float *y, long N) {
    const long cb = CODE_BYTES(KIND), ns = SCALES(KIND);
    __m512 sa[MAX_X], sb[MAX_X];
    for (int r = 0; r < M; r++) sa[r] = sb[r] = _mm512_setzero_ps();
    for (long j = 0; j < blocks; j++) {
        __m512 a0, a1, b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
        if (KIND == 0) q4_1_block(a + j * cb, da + j * ns, &a0, &a1);
        else q8_0_block(a + j * cb, da + j * ns, &a0, &a1);
        if (TWO == 2) {
            if (KIND == 0) q4_1_block(b + j * cb, db + j * ns, &b0, &b1);
            else q8_0_block(b + j * cb, db + j * ns, &b0, &b1);
        }
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
    case M: tile(a, b, da, db, KIND, blocks, xr, K, M, TWO, yr, N); break;
#define TILES(KIND, TWO) \
    switch (m) { TILE_M(KIND, TWO, 1) TILE_M(KIND, TWO, 2) TILE_M(KIND, TWO, 3) TILE_M(KIND, TWO, 4) \
                 TILE_M(KIND, TWO, 5) TILE_M(KIND, TWO, 6) TILE_M(KIND, TWO, 7) TILE_M(KIND, TWO, 8) }

/* y[r, n] = W[n, :] . x[r, :] for r < rows and n0 <= n < n1; W as K / 32 blocks a row: `codes` (16 bytes a
   block for kind 0, Q4_1; 32 for kind 1, Q8_0) and `scales` (2 floats a block for Q4_1, 1 for Q8_0); x rows of K
   floats, y rows of N floats. Weight rows go two at a time against every MAX_X rows of x in turn. */
TARGET static void packed_rows(const uint8_t *codes, const float *scales, int kind, long K, const float *x,
                               int rows, float *y, long N, long n0, long n1) {
    const long blocks = K / QK, row_bytes = blocks * CODE_BYTES(kind), row_scales = blocks * SCALES(kind);
    for (int r0 = 0; r0 < rows; r0 += MAX_X) {  /* a chunk of x stays in L1 while the weight rows stream past */
        const int m = rows - r0 < MAX_X ? rows - r0 : MAX_X;
        const float *xr = x + r0 * K;
        for (long n = n0; n < n1; n += 2) {
            const uint8_t *a = codes + n * row_bytes, *b = a + row_bytes;
            const float *da = scales + n * row_scales, *db = da + row_scales;
            const int two = n + 1 < n1;
            float *yr = y + r0 * N + n;
            if (kind == 0) { if (two) { TILES(0, 2) } else { TILES(0, 1) } }
            else { if (two) { TILES(1, 2) } else { TILES(1, 1) } }
        }
    }
}

/* All N rows as above, split over `threads` OpenMP threads in even runs (the library is linked with -fopenmp
   where the compiler has it, and then shares the process's OpenMP runtime, PyTorch's, whose threads wait between
   parallel regions; without it, one thread). */
TARGET void l3_gemv_packed(const uint8_t *codes, const float *scales, int kind, long K, const float *x, int rows,
                           float *y, long N, int threads) {
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            long t = omp_get_thread_num(), T = omp_get_num_threads();
            long a = N * t / T / 2 * 2, b = t + 1 == T ? N : N * (t + 1) / T / 2 * 2;
            packed_rows(codes, scales, kind, K, x, rows, y, N, a, b);
        }
        return;
    }
#endif
    (void)threads;
    packed_rows(codes, scales, kind, K, x, rows, y, N, 0, N);
}

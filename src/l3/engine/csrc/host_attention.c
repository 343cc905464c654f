/* Decode attention over fp16 or fp32 KV in host memory, for the engine's host-memory backends
   (l3/engine/host_kernel.py builds it with the system's C compiler at first use; without one, or without
   AVX2/FMA/F16C, the backends use their PyTorch paths). One pass over the keys and values, by blocks of BLOCK
   rows: scores for R = 8 / G key rows at a time (each key chunk loaded, and widened from fp16, in a register and
   used by all G queries of its KV head, eight accumulators reduced by one horizontal-add tree), online softmax
   with a vectorised exp, then the values, C = 8 / G chunks of 8 columns at a time (each value chunk loaded once
   per row and used by every query). While a block's scores run, its value rows and the key rows KEY_AHEAD rows
   on are prefetched, so the memory streams overlap the arithmetic. The online softmax state carries over from
   one run of contiguous keys to the next, so a request whose KV sits in several runs (paged blocks) is attended
   in one pass (`l3_decode`). Numerics: fp32 throughout (checked against float64). */
#include <math.h>
#include <stdint.h>

#include "simd.h"

/* exp(x) for x <= 0 (arguments here are s - max): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor
   polynomial (relative error below 2e-7 on that range), 2^n put into the exponent bits; below -87, zero. */
static inline __m256 exp_nonpos(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

#define BLOCK 16      /* rows per online-softmax step */
#define KEY_AHEAD 64  /* rows between the keys being scored and the keys being prefetched */

/* Element i of a row of fp32 (F32) or fp16 values, and the 8 from there as fp32. F32 is a constant at every
   call (the functions are inlined per element type), so the choice costs nothing in the loops. */
static inline __attribute__((always_inline)) const char *at(const void *p, long i, const int F32) {
    return (const char *)p + i * (F32 ? 4 : 2);
}
static inline __attribute__((always_inline)) __m256 load8(const void *p, long i, const int F32) {
    return F32 ? _mm256_loadu_ps((const float *)at(p, i, 1))
               : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)at(p, i, 0)));
}

static inline __attribute__((always_inline)) void prefetch(const char *p, int bytes) {
    for (int o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

/* s[g][r] = q_g . k_r for G queries and R consecutive key rows (R * G <= 8 accumulators). */
static inline __attribute__((always_inline)) void scores(const void *kr, const int F32, const float *qh,
                                                         const int G, const int R, int E, float s[][BLOCK]) {
    __m256 d[8];
    for (int i = 0; i < 8; i++) d[i] = _mm256_setzero_ps();
    for (int e = 0; e < E; e += 8) {
        __m256 kv[8];
        for (int r = 0; r < R; r++) kv[r] = load8(kr, (long)r * E + e, F32);
        for (int g = 0; g < G; g++) {
            __m256 qv = _mm256_loadu_ps(qh + g * E + e);
            __asm__("" : "+x"(qv));  /* one load per query chunk, kept in a register for the R rows */
            for (int r = 0; r < R; r++) d[r * G + g] = _mm256_fmadd_ps(kv[r], qv, d[r * G + g]);
        }
    }
    float t[8] __attribute__((aligned(32)));
    _mm256_store_ps(t, hsum8(d));
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) s[g][r] = t[r * G + g];
}

/* acc[g][e .. e + 8C) = acc * rs[g] + sum_b p[g][b] v_b over nb value rows (G * C <= 8 accumulators). */
static inline __attribute__((always_inline)) void values(const void *vh, const int F32, int nb, const int G,
                                                         const int C, int E, int e, const float *rs,
                                                         float p[][BLOCK], float *acc) {
    __m256 a[8];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++)
            a[g * C + c] = _mm256_mul_ps(_mm256_loadu_ps(acc + g * E + e + 8 * c), _mm256_set1_ps(rs[g]));
    for (int b = 0; b < nb; b++) {
        __m256 vv[8];
        for (int c = 0; c < C; c++) vv[c] = load8(vh, (long)b * E + e + 8 * c, F32);
        for (int g = 0; g < G; g++) {
            __m256 pb = _mm256_broadcast_ss(&p[g][b]);
            for (int c = 0; c < C; c++) a[g * C + c] = _mm256_fmadd_ps(pb, vv[c], a[g * C + c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) _mm256_storeu_ps(acc + g * E + e + 8 * c, a[g * C + c]);
}

/* Attention of G query rows per KV head over m more contiguous keys and values, heads h0..h1-1, continuing the
   online softmax state (mx, sum, acc) each head already has. Element (h, j, e) of K is k[h * hs + j * E + e]
   (V alike); q is fp32 [kvh][G][E], already scaled. State: mx, sum [kvh][G]; acc [kvh][G][E] = sum_j exp(s_j -
   mx) v_j (unnormalised). E a multiple of 8, G <= 8. */
static inline __attribute__((always_inline)) void attend(
    const void *k, const void *v, const int F32, long hs, int h0, int h1, const int G, int E, long m,
    const float *q, float *mx, float *sum, float *acc) {
    const int R = 8 / G, C = 8 / G;  /* key rows per score pass (BLOCK is a multiple), value chunks per pass */
    const int row = E * (F32 ? 4 : 2);
    float s[8][BLOCK] __attribute__((aligned(32))), rs[8];
    for (int h = h0; h < h1; h++) {
        const float *qh = q + (long)h * G * E;
        float *m_h = mx + (long)h * G, *l_h = sum + (long)h * G, *a_h = acc + (long)h * G * E;
        const void *kh = at(k, h * hs, F32), *vh = at(v, h * hs, F32);
        for (long j0 = 0; j0 < m; j0 += BLOCK) {
            const int nb = (int)((m - j0) < BLOCK ? (m - j0) : BLOCK);
            const void *kb = at(kh, j0 * E, F32), *vb = at(vh, j0 * E, F32);
            int b = 0;
            for (; b + R <= nb; b += R) {
                prefetch(at(vb, (long)b * E, F32), R * row);
                if (j0 + b + KEY_AHEAD + R <= m) prefetch(at(kb, (long)(b + KEY_AHEAD) * E, F32), R * row);
                scores(at(kb, (long)b * E, F32), F32, qh, G, R, E, (float(*)[BLOCK]) & s[0][b]);
            }
            for (; b < nb; b++) scores(at(kb, (long)b * E, F32), F32, qh, G, 1, E, (float(*)[BLOCK]) & s[0][b]);
            for (b = nb; b < BLOCK; b++)
                for (int g = 0; g < G; g++) s[g][b] = -INFINITY;
            for (int g = 0; g < G; g++) {  /* online softmax: new max, rescale factor, exponentiate */
                float bm = m_h[g];
                for (b = 0; b < nb; b++) bm = s[g][b] > bm ? s[g][b] : bm;
                rs[g] = m_h[g] == -INFINITY ? 0.0f : expf(m_h[g] - bm);
                __m256 bmv = _mm256_set1_ps(bm), tot = _mm256_setzero_ps();
                for (b = 0; b < BLOCK; b += 8) {
                    __m256 p = exp_nonpos(_mm256_sub_ps(_mm256_load_ps(&s[g][b]), bmv));
                    _mm256_store_ps(&s[g][b], p);
                    tot = _mm256_add_ps(tot, p);
                }
                l_h[g] = l_h[g] * rs[g] + hsum(tot);
                m_h[g] = bm;
            }
            int e = 0;
            for (; e + 8 * C <= E; e += 8 * C) values(vb, F32, nb, G, C, E, e, rs, s, a_h);
            for (; e < E; e += 8) values(vb, F32, nb, G, 1, E, e, rs, s, a_h);
        }
    }
}

/* The empty state of heads h0..h1-1 (no key seen). */
static void reset(int h0, int h1, int G, int E, float *mx, float *sum, float *acc) {
    for (long i = (long)h0 * G; i < (long)h1 * G; i++) { mx[i] = -INFINITY; sum[i] = 0.0f; }
    for (long i = (long)h0 * G * E; i < (long)h1 * G * E; i++) acc[i] = 0.0f;
}

/* `attend` with G and the element type as constants: per-query accumulators stay in registers. */
#define ATTEND_G(F32)                                                                                             \
    switch (G) {                                                                                                  \
    case 1: attend(k, v, F32, hs, h0, h1, 1, E, m, q, mx, sum, acc); break;                                       \
    case 2: attend(k, v, F32, hs, h0, h1, 2, E, m, q, mx, sum, acc); break;                                       \
    case 3: attend(k, v, F32, hs, h0, h1, 3, E, m, q, mx, sum, acc); break;                                       \
    case 4: attend(k, v, F32, hs, h0, h1, 4, E, m, q, mx, sum, acc); break;                                       \
    case 5: attend(k, v, F32, hs, h0, h1, 5, E, m, q, mx, sum, acc); break;                                       \
    case 6: attend(k, v, F32, hs, h0, h1, 6, E, m, q, mx, sum, acc); break;                                       \
    case 7: attend(k, v, F32, hs, h0, h1, 7, E, m, q, mx, sum, acc); break;                                       \
    default: attend(k, v, F32, hs, h0, h1, 8, E, m, q, mx, sum, acc); break;                                      \
    }

static void attend_any(const void *k, const void *v, int f32, long hs, int h0, int h1, int G, int E, long m,
                       const float *q, float *mx, float *sum, float *acc) {
    if (f32) {
        ATTEND_G(1)
    } else {
        ATTEND_G(0)
    }
}

/* Unnormalised attention (a partial: mx, sum, acc as `attend` leaves them) over one run of m contiguous keys. */
void l3_partial(const void *k, const void *v, int f32, long hs, int h0, int h1, int G, int E, long m,
                const float *q, float *mx, float *sum, float *acc) {
    reset(h0, h1, G, E, mx, sum, acc);
    attend_any(k, v, f32, hs, h0, h1, G, E, m, q, mx, sum, acc);
}

/* Normalised decode attention of requests b0..b1-1 (one query row each), heads h0..h1-1. Request b's keys are
   the runs r = run_lo[b] .. run_lo[b + 1] - 1 of runs[2r + 1] contiguous slots from slot runs[2r]; slot j of KV
   head h is at element h * hs + j * E of k (v alike). q and out: fp32 [B][kvh][G][E], q already scaled. A
   request with no key gets zeros. */
void l3_decode(const void *k, const void *v, int f32, long hs, int kvh, int G, int E, const long *runs,
               const long *run_lo, int b0, int b1, int h0, int h1, const float *q, float *out) {
    const long per = (long)kvh * G;
    float mb[per], lb[per];  /* one request's running max and sum per query head */
    for (int b = b0; b < b1; b++) {
        float *ob = out + b * per * E;
        const float *qb = q + b * per * E;
        reset(h0, h1, G, E, mb, lb, ob);
        for (long r = run_lo[b]; r < run_lo[b + 1]; r++)
            attend_any(at(k, runs[2 * r] * E, f32), at(v, runs[2 * r] * E, f32), f32, hs, h0, h1, G, E,
                       runs[2 * r + 1], qb, mb, lb, ob);
        for (long i = (long)h0 * G; i < (long)h1 * G; i++) {
            const float inv = lb[i] > 0.0f ? 1.0f / lb[i] : 0.0f;
            for (int e = 0; e < E; e++) ob[i * E + e] *= inv;
        }
    }
}

/* l3_decode over `n` spans (first request, end request, first KV head, end KV head; 4 longs each), shared among
   `threads` OpenMP threads (one at a time each; the library shares PyTorch's OpenMP runtime where it is linked
   with -fopenmp, otherwise the spans run in turn on the calling thread). */
void l3_decode_spans(const void *k, const void *v, int f32, long hs, int kvh, int G, int E, const long *runs,
                     const long *run_lo, const long *spans, int n, const float *q, float *out, int threads) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && n > 1)
#endif
    for (int i = 0; i < n; i++) {
        const long *s = spans + 4 * i;
        l3_decode(k, v, f32, hs, kvh, G, E, runs, run_lo, (int)s[0], (int)s[1], (int)s[2], (int)s[3], q, out);
    }
    (void)threads;
}

/* Decode attention over fp16 KV in host memory, for the engine's `cpu` backend (l3/engine/host_kernel.py builds
   it with the system's C compiler at first use; without one, or without AVX2/FMA/F16C, the backend uses its
   PyTorch path). One pass over the keys and values: each block of BLOCK rows is widened to fp32 once, into L1;
   scores for 8 rows at a time per query (horizontal adds); online softmax with a vectorised exp; values
   accumulated with two independent chains per query. Numerics: fp32 throughout (checked against float64). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 32

static inline float hsum(__m256 x) {
    __m128 lo = _mm256_castps256_ps128(x), hi = _mm256_extractf128_ps(x, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

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

/* Unnormalised attention of G query rows per KV head over m contiguous fp16 keys and values, heads h0..h1-1.
   Element (h, j, e) of K is k[h * hs + j * E + e] (V alike); q is fp32 [kvh][G][E], already scaled.
   Out: mx, sum [kvh][G]; acc [kvh][G][E] = sum_j exp(s_j - mx) v_j. E a multiple of 8, G <= 8. */
static inline __attribute__((always_inline)) void partial(
    const uint16_t *k, const uint16_t *v, long hs, int h0, int h1, const int G, int E, long m,
    const float *q, float *mx, float *sum, float *acc) {
    float s[8][BLOCK] __attribute__((aligned(32)));
    static __thread float kf[BLOCK * 256] __attribute__((aligned(32))), vf[BLOCK * 256] __attribute__((aligned(32)));
    for (int h = h0; h < h1; h++) {
        const float *qh = q + (long)h * G * E;
        float *m_h = mx + (long)h * G, *l_h = sum + (long)h * G, *a_h = acc + (long)h * G * E;
        for (int g = 0; g < G; g++) { m_h[g] = -INFINITY; l_h[g] = 0.0f; }
        for (long e = 0; e < (long)G * E; e++) a_h[e] = 0.0f;
        const uint16_t *kh = k + h * hs, *vh = v + h * hs;
        for (long j0 = 0; j0 < m; j0 += BLOCK) {
            int nb = (int)((m - j0) < BLOCK ? (m - j0) : BLOCK);
            for (int b = 0; b < nb; b++)  /* widen the block's K and V rows once, into L1 */
                for (int e = 0; e < E; e += 8) {
                    _mm256_store_ps(kf + b * E + e, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kh + (j0 + b) * E + e))));
                    _mm256_store_ps(vf + b * E + e, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vh + (j0 + b) * E + e))));
                }
            for (int b = nb; b < BLOCK; b++)
                for (int e = 0; e < E; e += 8) {
                    _mm256_store_ps(kf + b * E + e, _mm256_setzero_ps());
                    _mm256_store_ps(vf + b * E + e, _mm256_setzero_ps());
                }
            for (int b0 = 0; b0 < BLOCK; b0 += 8) {  /* scores, 8 tokens at a time per query */
                const float *kr = kf + b0 * E;
                for (int g = 0; g < G; g++) {
                    __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0, d4 = d0, d5 = d0, d6 = d0, d7 = d0;
                    const float *qg = qh + g * E;
                    for (int e = 0; e < E; e += 8) {
                        __m256 qv = _mm256_loadu_ps(qg + e);
#define DOT(i, d) d = _mm256_fmadd_ps(_mm256_load_ps(kr + (i) * E + e), qv, d)
                        DOT(0, d0); DOT(1, d1); DOT(2, d2); DOT(3, d3); DOT(4, d4); DOT(5, d5); DOT(6, d6); DOT(7, d7);
                    }
                    __m256 t01 = _mm256_hadd_ps(d0, d1), t23 = _mm256_hadd_ps(d2, d3);
                    __m256 t45 = _mm256_hadd_ps(d4, d5), t67 = _mm256_hadd_ps(d6, d7);
                    __m256 a = _mm256_hadd_ps(t01, t23), c = _mm256_hadd_ps(t45, t67);
                    _mm256_store_ps(&s[g][b0], _mm256_add_ps(_mm256_permute2f128_ps(a, c, 0x20),
                                                             _mm256_permute2f128_ps(a, c, 0x31)));
                }
            }
            for (int b = nb; b < BLOCK; b++)
                for (int g = 0; g < G; g++) s[g][b] = -INFINITY;
            for (int g = 0; g < G; g++) {  /* online softmax: new max, rescale, exponentiate */
                float bm = m_h[g];
                for (int b = 0; b < nb; b++) bm = s[g][b] > bm ? s[g][b] : bm;
                float r = expf(m_h[g] - bm);
                l_h[g] *= r;
                float *ag = a_h + g * E;
                __m256 rv = _mm256_set1_ps(r), bmv = _mm256_set1_ps(bm), tot = _mm256_setzero_ps();
                for (int e = 0; e < E; e += 8) _mm256_storeu_ps(ag + e, _mm256_mul_ps(_mm256_loadu_ps(ag + e), rv));
                for (int b = 0; b < BLOCK; b += 8) {
                    __m256 p = exp_nonpos(_mm256_sub_ps(_mm256_load_ps(&s[g][b]), bmv));
                    _mm256_store_ps(&s[g][b], p);
                    tot = _mm256_add_ps(tot, p);
                }
                l_h[g] += hsum(tot);
                m_h[g] = bm;
            }
            for (int e = 0; e < E; e += 8) {  /* acc += p v, one 8-wide column of every query's row at a time */
                __m256 a[8], b2[8];
                for (int g = 0; g < G; g++) { a[g] = _mm256_loadu_ps(a_h + g * E + e); b2[g] = _mm256_setzero_ps(); }
                for (int b = 0; b < nb; b += 2) {  /* two tokens: twice the independent chains */
                    __m256 v0 = _mm256_load_ps(vf + b * E + e), v1 = _mm256_load_ps(vf + (b + 1) * E + e);
                    for (int g = 0; g < G; g++) {
                        a[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(&s[g][b]), v0, a[g]);
                        b2[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(&s[g][b + 1]), v1, b2[g]);
                    }
                }
                for (int g = 0; g < G; g++) _mm256_storeu_ps(a_h + g * E + e, _mm256_add_ps(a[g], b2[g]));
            }
        }
    }
}

void l3_partial_f16(const uint16_t *k, const uint16_t *v, long hs, int h0, int h1, int G, int E, long m,
                    const float *q, float *mx, float *sum, float *acc) {
    switch (G) {  /* the group size as a constant: per-query accumulators stay in registers */
    case 1: partial(k, v, hs, h0, h1, 1, E, m, q, mx, sum, acc); break;
    case 2: partial(k, v, hs, h0, h1, 2, E, m, q, mx, sum, acc); break;
    case 3: partial(k, v, hs, h0, h1, 3, E, m, q, mx, sum, acc); break;
    case 4: partial(k, v, hs, h0, h1, 4, E, m, q, mx, sum, acc); break;
    case 5: partial(k, v, hs, h0, h1, 5, E, m, q, mx, sum, acc); break;
    case 6: partial(k, v, hs, h0, h1, 6, E, m, q, mx, sum, acc); break;
    case 7: partial(k, v, hs, h0, h1, 7, E, m, q, mx, sum, acc); break;
    default: partial(k, v, hs, h0, h1, 8, E, m, q, mx, sum, acc); break;
    }
}

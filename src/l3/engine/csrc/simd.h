/* Horizontal sums shared by the engine's host kernels (AVX2). */
#pragma once
#include <immintrin.h>

static inline float hsum(__m256 x) {
    __m128 lo = _mm256_castps256_ps128(x), hi = _mm256_extractf128_ps(x, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* The 8 horizontal sums of d[0..7], in order, as one vector. */
static inline __m256 hsum8(const __m256 *d) {
    __m256 t01 = _mm256_hadd_ps(d[0], d[1]), t23 = _mm256_hadd_ps(d[2], d[3]);
    __m256 t45 = _mm256_hadd_ps(d[4], d[5]), t67 = _mm256_hadd_ps(d[6], d[7]);
    __m256 a = _mm256_hadd_ps(t01, t23), c = _mm256_hadd_ps(t45, t67);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, c, 0x20), _mm256_permute2f128_ps(a, c, 0x31));
}

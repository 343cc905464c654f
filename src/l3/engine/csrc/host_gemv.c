/* One-row projections of the engine's dense layers on the CPU (l3/engine/host_kernel.py builds it with
   host_attention.c): y = W x for fp32 W (N rows of K), the weights streamed once, eight rows at a time against
   the one input row (kept in L1), eight accumulators reduced by one horizontal-add tree into eight outputs.
   On the 2-core machine of docs/benchmarks.md, SmolLM2's layers and LM head (540 MB of fp32 weights) take
   45-57 ms this way against 65-71 ms through PyTorch's `linear`. Numerics: fp32, the products summed in another
   order. */
#include "simd.h"

/* y[n] = w[n, :] . x for n0 <= n < n1; w rows of K contiguous floats. */
void l3_gemv_f32(const float *w, long K, const float *x, float *y, long n0, long n1) {
    long n = n0;
    for (; n + 8 <= n1; n += 8) {
        const float *wn = w + n * K;
        __m256 d[8];
        for (int r = 0; r < 8; r++) d[r] = _mm256_setzero_ps();
        long k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 xv = _mm256_loadu_ps(x + k);
            for (int r = 0; r < 8; r++) d[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wn + r * K + k), xv, d[r]);
        }
        float t[8] __attribute__((aligned(32)));
        _mm256_store_ps(t, hsum8(d));
        for (int r = 0; r < 8; r++) {
            for (long j = k; j < K; j++) t[r] += wn[r * K + j] * x[j];
            y[n + r] = t[r];
        }
    }
    for (; n < n1; n++) {
        const float *wn = w + n * K;
        __m256 d = _mm256_setzero_ps();
        long k = 0;
        for (; k + 8 <= K; k += 8) d = _mm256_fmadd_ps(_mm256_loadu_ps(wn + k), _mm256_loadu_ps(x + k), d);
        float s = hsum(d);
        for (; k < K; k++) s += wn[k] * x[k];
        y[n] = s;
    }
}

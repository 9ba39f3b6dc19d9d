// What the CPU kernels share: a row-major matrix product through the BLAS that torch itself
// is linked with (MKL on x86 Linux), a row softmax's exponential written to vectorize, and the
// rotary turn of one head.
#pragma once

#include <algorithm>
#include <cstdint>

// Weak, so that a torch built without a Fortran-style BLAS still loads this library; the
// Python side then asks has_blas() and keeps torch's own kernels.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace lmforge {

inline bool has_blas() { return sgemm_ != nullptr; }

// Row-major C[M, N] = alpha * op(A) @ op(B) + beta * C, op(A) being (M, K). The BLAS is
// column-major, where the same memory holds the transposes: C^T = op(B)^T op(A)^T.
inline void mm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const int lda_ = static_cast<int>(lda), ldb_ = static_cast<int>(ldb), ldc_ = static_cast<int>(ldc);
  sgemm_(&tb, &ta, &n, &m, &k, &alpha, B, &ldb_, A, &lda_, &beta, C, &ldc_);
}

// exp(a) for a <= 0: a degree-6 polynomial on the range-reduced argument (Cephes' expf,
// relative error ~1e-7), written so that loops calling it turn into vector code.
inline float exp_nonpositive(float a) {
  a = a < -87.3f ? -87.3f : a;  // exp underflows to ~0 below; keeps the exponent bits valid
  const float k = __builtin_floorf(a * 1.44269504088896341f + 0.5f);  // a = k ln2 + r
  const float r = a - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t two_to_k = (static_cast<int32_t>(k) + 127) << 23;
  return p * __builtin_bit_cast(float, two_to_k);
}

// Row reductions keep 16 partial results (one 512-bit register) and fold them in halves at the
// end: an omp simd reduction's last step came out as 16 dependent scalar operations per row,
// which cost as much as the row itself at attention's row lengths.
constexpr int64_t kLanes = 16;

inline float fold_sum(float* acc) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) acc[k] += acc[k + width];
  return acc[0];
}

inline float fold_max(float* acc) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) acc[k] = acc[k + width] > acc[k] ? acc[k + width] : acc[k];
  return acc[0];
}

// x[j] = exp(x[j] - shift) for j < n, for arguments at most 0 (shift is the row maximum or
// the log-sum-exp); returns their sum.
inline float exp_shifted(float* x, int64_t n, float shift) {
  alignas(64) float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) {
      const float e = exp_nonpositive(x[j + k] - shift);
      x[j + k] = e;
      acc[k] += e;
    }
  float tail = 0.f;
  for (; j < n; ++j) {
    x[j] = exp_nonpositive(x[j] - shift);
    tail += x[j];
  }
  return fold_sum(acc) + tail;
}

// Dropout's keep/drop decision for element j of score row `row`: a counter-based hash of
// (seed, row, j), so the backward regenerates the forward's mask instead of storing it.
// splitmix64 spreads (seed, row) into a 32-bit salt; lowbias32 (a bijection) mixes in j.
inline uint32_t row_salt(uint64_t seed, uint64_t row) {
  uint64_t z = seed + (row + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return static_cast<uint32_t>(z ^ (z >> 31));
}

// factor[j] = scale where element j is kept (hash >= threshold, threshold = p * 2^32), else 0.
inline void dropout_factors(float* factor, int64_t n, uint32_t salt, uint32_t threshold, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t x = salt + static_cast<uint32_t>(j);
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    factor[j] = x >= threshold ? scale : 0.f;
  }
}

// Rotary embeddings, channel i of a head pairing with channel i + hs / 2 (cos and signed sin
// tables as ops/rotary.py makes them).
// out = x cos + swap_halves(x) signed_sin for one head of hs channels.
inline void turn(float* out, const float* x, const float* c, const float* s, int64_t hs) {
  const int64_t half = hs / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * c[i] + x[i + half] * s[i];
#pragma omp simd
  for (int64_t i = half; i < hs; ++i) out[i] = x[i] * c[i] + x[i - half] * s[i];
}

// The transpose of `turn`: dx_j = g_j cos_j + g_swap(j) signed_sin_swap(j).
inline void turn_back(float* out, const float* g, const float* c, const float* s, int64_t hs) {
  const int64_t half = hs / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i] = g[i] * c[i] + g[i + half] * s[i + half];
#pragma omp simd
  for (int64_t i = half; i < hs; ++i) out[i] = g[i] * c[i] + g[i - half] * s[i - half];
}

inline float max_of(const float* x, int64_t n) {
  float m = x[0];
  int64_t j = 1;
  if (n >= kLanes) {
    alignas(64) float acc[kLanes];
    std::copy_n(x, kLanes, acc);
    for (j = kLanes; j + kLanes <= n; j += kLanes)
#pragma omp simd
      for (int64_t k = 0; k < kLanes; ++k) acc[k] = x[j + k] > acc[k] ? x[j + k] : acc[k];
    m = fold_max(acc);
  }
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

}  // namespace lmforge

// One decode step's attention for a Llama-class model, float32 on a CPU: from the q | k | v
// projection's rows (B, (nh + 2 nkv) hs) written at cache column `start` (turned by the angles
// of one position (1, hs) or of each row's own (B, hs)) to the attention's output
// rows (B, nh hs), in one call where torch's ops take about fifteen (split, rotary, views,
// two cache writes, the attention and its reshapes). The new key (turned by its angle) and value
// are written into the layer's cache buffers (B, nkv, max_len, hs) at `start`; each query head
// (turned, then scaled by 1 / sqrt(hs)) reads the keys 0 .. start of its group's head.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <cmath>
#include <vector>

#include "blas.h"

namespace lmforge {
namespace {

inline void turn_row(float* out, const float* x, const float* c, const float* s, int64_t hs, float scale) {
  const int64_t half = hs / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i] = (x[i] * c[i] + x[i + half] * s[i]) * scale;
#pragma omp simd
  for (int64_t i = half; i < hs; ++i) out[i] = (x[i] * c[i] + x[i - half] * s[i]) * scale;
}

// softmax(q . k_t) over t < keys, then sum_t p_t v_t into y.
void attend_one(float* y, const float* q, const float* K, const float* V, int64_t keys, int64_t hs,
                float* scores) {
  for (int64_t t = 0; t < keys; ++t) {
    const float* k = K + t * hs;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < hs; ++d) dot += q[d] * k[d];
    scores[t] = dot;
  }
  const float sum = exp_shifted(scores, keys, max_of(scores, keys));
  std::fill(y, y + hs, 0.f);
  for (int64_t t = 0; t < keys; ++t) {
    const float p = scores[t] / sum, *v = V + t * hs;
#pragma omp simd
    for (int64_t d = 0; d < hs; ++d) y[d] += p * v[d];
  }
}

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                            at::Tensor& v_cache, int64_t start, int64_t n_head) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&qkv, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "decode_attention: every tensor must be contiguous float32 on a CPU");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "decode_attention: the caches must be (B, n_kv_head, max_len, head_dim)");
  const int64_t B = k_cache.size(0), KV = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(n_head % KV == 0 && D % 2 == 0, "decode_attention: n_head must be a multiple of n_kv_head");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == B && qkv.size(1) == (n_head + 2 * KV) * D,
              "decode_attention: qkv must be (B, (n_head + 2 n_kv_head) head_dim)");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D && sin.sizes() == cos.sizes() &&
                  (cos.size(0) == 1 || cos.size(0) == B),
              "decode_attention: cos / sin must be (1, hs) or one position per row (B, hs)");
  TORCH_CHECK(start >= 0 && start < L, "decode_attention: position ", start, " is outside the cache of ", L);
  const int64_t g = n_head / KV, width = qkv.size(1), keys = start + 1;
  auto out = at::empty({B, n_head * D}, qkv.options());
  const float *in = qkv.data_ptr<float>(), *cos_rows = cos.data_ptr<float>(), *sin_rows = sin.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>(), *o = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  // One task per (row, key / value head): its cache rows first, then its group's queries.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, keys * D * g));
  at::parallel_for(0, B * KV, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(keys), q(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, j = task % KV;
      const float *row = in + b * width, *c = cos_rows + (b % cos.size(0)) * D, *s = sin_rows + (b % cos.size(0)) * D;
      float *K = kc + (b * KV + j) * L * D, *V = vc + (b * KV + j) * L * D;
      turn_row(K + start * D, row + (n_head + j) * D, c, s, D, 1.f);
      std::copy(row + (n_head + KV + j) * D, row + (n_head + KV + j + 1) * D, V + start * D);
      for (int64_t i = 0; i < g; ++i) {
        const int64_t h = j * g + i;
        turn_row(q.data(), row + h * D, c, s, D, scale);
        attend_one(o + b * n_head * D + h * D, q.data(), K, V, keys, D, scores.data());
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace lmforge

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor signed_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int start, int n_head) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("decode_attention", &lmforge::decode_attention); }

// Causal self-attention for float32 on a CPU, forward and backward, straight from the (B, T, 3C)
// output of the qkv projection to the (B, T, C) input of the output projection: no (B, nh, T, hs)
// copies either way. One (batch, head) pair per task; within it, 64-query row blocks see only
// the keys up to their last query, so the products skip most of the masked half, and a block's
// scores (64 x T) stay in cache from the product through the softmax to the next product.
// The forward keeps the log-sum-exp of each row; the backward recomputes the probabilities.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "blas.h"

namespace lmforge {
namespace {

constexpr int64_t kRowBlock = 64;  // 32 was as fast, 128 about 15% slower (T = 256, hs = 64)

struct Shape {
  int64_t B, T, C, H, D;
  Shape(const at::Tensor& qkv, int64_t n_head)
      : B(qkv.size(0)), T(qkv.size(1)), C(qkv.size(2) / 3), H(n_head), D(qkv.size(2) / 3 / n_head) {}
};

void check(const at::Tensor& qkv, int64_t n_head) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 3 && qkv.is_contiguous(),
              "causal_attention: qkv must be a contiguous float32 CPU tensor (B, T, 3C)");
  TORCH_CHECK(n_head > 0 && qkv.size(2) % (3 * n_head) == 0, "causal_attention: 3C is not a multiple of 3 * n_head");
  TORCH_CHECK(has_blas(), "causal_attention: torch was built without a BLAS these kernels can call");
}

// (out, lse): out (B, T, C) = softmax(q k^T / sqrt(hs), causal) v per head; lse (B, nh, T).
std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& qkv, int64_t n_head) {
  check(qkv, n_head);
  const Shape s(qkv, n_head);
  auto out = at::empty({s.B, s.T, s.C}, qkv.options());
  auto lse = at::empty({s.B, s.H, s.T}, qkv.options());
  if (out.numel() == 0) return {out, lse};
  const float scale = 1.f / std::sqrt(static_cast<float>(s.D));
  const float* qkv_data = qkv.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  float* lse_data = lse.data_ptr<float>();
  const int64_t ld = 3 * s.C;
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kRowBlock * s.T);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      const float* Q = qkv_data + b * s.T * ld + h * s.D;
      const float* K = Q + s.C;
      const float* V = Q + 2 * s.C;
      float* O = out_data + b * s.T * s.C + h * s.D;
      float* L = lse_data + bh * s.T;
      for (int64_t i0 = 0; i0 < s.T; i0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, s.T - i0), keys = i0 + rows;
        float* S = scores.data();
        mm(false, true, rows, keys, s.D, scale, Q + i0 * ld, ld, K, ld, 0.f, S, keys);
        for (int64_t r = 0; r < rows; ++r) {
          float* row = S + r * keys;
          const int64_t seen = i0 + r + 1;  // query i0 + r sees keys 0 .. i0 + r
          const float peak = max_of(row, seen);
          const float sum = exp_shifted(row, seen, peak);
          const float inv = 1.f / sum;
#pragma omp simd
          for (int64_t j = 0; j < seen; ++j) row[j] *= inv;
          std::fill(row + seen, row + keys, 0.f);
          L[i0 + r] = peak + std::log(sum);
        }
        mm(false, false, rows, s.D, keys, 1.f, S, keys, V, ld, 0.f, O + i0 * s.C, s.C);
      }
    }
  });
  return {out, lse};
}

// d loss / d qkv (B, T, 3C) from d loss / d out (B, T, C).
at::Tensor causal_attention_backward(const at::Tensor& grad_out_any, const at::Tensor& qkv, const at::Tensor& out,
                                     const at::Tensor& lse, int64_t n_head) {
  check(qkv, n_head);
  const at::Tensor grad_out = grad_out_any.contiguous();
  const Shape s(qkv, n_head);
  auto grad_qkv = at::empty_like(qkv);
  if (grad_qkv.numel() == 0) return grad_qkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(s.D));
  const float* qkv_data = qkv.data_ptr<float>();
  const float* out_data = out.data_ptr<float>();
  const float* grad_out_data = grad_out.data_ptr<float>();
  const float* lse_data = lse.data_ptr<float>();
  float* grad_data = grad_qkv.data_ptr<float>();
  const int64_t ld = 3 * s.C;
  // The last row block reaches every key: going backwards from it, its products set dK and dV
  // (beta 0) and the earlier blocks add to them.
  const int64_t last = ((s.T - 1) / kRowBlock) * kRowBlock;
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(kRowBlock * s.T), grad_scores(kRowBlock * s.T), out_dot_grad(s.T);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      const int64_t offset = b * s.T * ld + h * s.D;
      const float *Q = qkv_data + offset, *K = Q + s.C, *V = Q + 2 * s.C;
      float *dQ = grad_data + offset, *dK = dQ + s.C, *dV = dQ + 2 * s.C;
      const float* O = out_data + b * s.T * s.C + h * s.D;
      const float* dO = grad_out_data + b * s.T * s.C + h * s.D;
      const float* L = lse_data + bh * s.T;
      for (int64_t i = 0; i < s.T; ++i) {  // softmax backward: dS = P * (dP - rowsum(dO * O))
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < s.D; ++d) dot += dO[i * s.C + d] * O[i * s.C + d];
        out_dot_grad[i] = dot;
      }
      for (int64_t i0 = last; i0 >= 0; i0 -= kRowBlock) {
        const int64_t rows = std::min(kRowBlock, s.T - i0), keys = i0 + rows;
        const float beta = i0 == last ? 0.f : 1.f;
        float *P = probs.data(), *dS = grad_scores.data();
        mm(false, true, rows, keys, s.D, scale, Q + i0 * ld, ld, K, ld, 0.f, P, keys);
        for (int64_t r = 0; r < rows; ++r) {
          float* row = P + r * keys;
          const int64_t seen = i0 + r + 1;
          exp_shifted(row, seen, L[i0 + r]);
          std::fill(row + seen, row + keys, 0.f);
        }
        mm(true, false, keys, s.D, rows, 1.f, P, keys, dO + i0 * s.C, s.C, beta, dV, ld);
        mm(false, true, rows, keys, s.D, 1.f, dO + i0 * s.C, s.C, V, ld, 0.f, dS, keys);
        for (int64_t r = 0; r < rows; ++r) {
          const float* p = P + r * keys;
          float* g = dS + r * keys;
          const float dot = out_dot_grad[i0 + r];
#pragma omp simd
          for (int64_t j = 0; j < keys; ++j) g[j] = p[j] * (g[j] - dot);
        }
        mm(false, false, rows, s.D, keys, scale, dS, keys, K, ld, 0.f, dQ + i0 * ld, ld);
        mm(true, false, keys, s.D, rows, scale, dS, keys, Q + i0 * ld, ld, beta, dK, ld);
      }
    }
  });
  return grad_qkv;
}

}  // namespace
}  // namespace lmforge

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("causal_attention(Tensor qkv, int n_head) -> (Tensor, Tensor)", &lmforge::causal_attention);
  m.def("causal_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int n_head) -> Tensor",
        &lmforge::causal_attention_backward);
}

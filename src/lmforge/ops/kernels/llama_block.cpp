// The elementwise parts of a Llama-class block for float32 on a CPU, forward and backward, each
// one pass over its rows where torch's ops make several (and keep more for the backward):
// - rotary: every head of (B, T, n hs) turned by its position's angles (the attention kernel
//   turns a training step's queries and keys itself: kernels/self_attention.cpp).
// - rms_norm: x / sqrt(mean(x^2) + eps) * weight, keeping 1 / rms per row for the backward.
// - swiglu: silu(gate) * up of the stacked gate | up projection (N, 2I) -> (N, I).
// Angles come as cos and signed sin tables (T, hs) (ops/rotary.py: RopeTables), channel i
// pairing with channel i + hs / 2 of its head.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "blas.h"

namespace lmforge {
namespace {

void check_float_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
}

// Every head of hs channels of x (..., W) turned (forward), or turned back (backward = true):
// row r of x (its leading dimensions flattened) by the angles of table row r % P, cos / sin
// being (P, hs) (P = T for (B, T, W), 1 for one position, one per row for rows at their own).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  check_float_cpu(x, "rotary: x");
  check_float_cpu(cos, "rotary: cos");
  check_float_cpu(sin, "rotary: signed_sin");
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes(), "rotary: cos / sin must be (P, hs)");
  const int64_t T = cos.size(0), D = cos.size(1), W = x.size(-1);
  TORCH_CHECK(D % 2 == 0 && W % D == 0, "rotary: hs must be even and divide x's width");
  const int64_t rows = x.numel() / W;
  TORCH_CHECK(T > 0 && rows % T == 0, "rotary: x's rows must repeat the table's ", T, " positions");
  auto out = at::empty_like(x);
  const float *in = x.data_ptr<float>(), *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *c = cs + (r % T) * D, *s = sn + (r % T) * D;
      for (int64_t h = 0; h < W / D; ++h) {
        if (backward)
          turn_back(o + r * W + h * D, in + r * W + h * D, c, s, D);
        else
          turn(o + r * W + h * D, in + r * W + h * D, c, s, D);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float_cpu(x, "rms_norm: x");
  check_float_cpu(weight, "rms_norm: weight");
  const int64_t C = x.size(-1), rows = x.numel() / C;
  TORCH_CHECK(weight.numel() == C, "rms_norm: weight must have x's width");
  auto out = at::empty_like(x);
  auto rstd = at::empty({rows}, x.options());
  const float *in = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float *o = out.data_ptr<float>(), *r_out = rstd.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* row = in + n * C;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t c = 0; c < C; ++c) squares += row[c] * row[c];
      const float r = 1.f / std::sqrt(squares / C + static_cast<float>(eps));
      r_out[n] = r;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[n * C + c] = row[c] * r * w[c];
    }
  });
  return {out, rstd};
}

// grad_x = r (s - normed mean(s normed)) (+ grad_residual, where x also went on as a residual
// and its gradient from there is added in the same pass), s = grad * weight, normed = x r;
// grad_weight = sum over rows of grad * normed, summed per block of rows, then across blocks.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd,
                                                     const std::optional<at::Tensor>& grad_residual) {
  check_float_cpu(grad, "rms_norm_backward: grad");
  check_float_cpu(x, "rms_norm_backward: x");
  check_float_cpu(rstd, "rms_norm_backward: rstd");
  const int64_t C = x.size(-1), rows = x.numel() / C;
  TORCH_CHECK(grad.numel() == x.numel() && rstd.numel() == rows && weight.numel() == C,
              "rms_norm_backward: grad, x, rstd and weight do not match");
  if (grad_residual) {
    check_float_cpu(*grad_residual, "rms_norm_backward: grad_residual");
    TORCH_CHECK(grad_residual->numel() == x.numel(), "rms_norm_backward: grad_residual must have x's size");
  }
  const float* res = grad_residual ? grad_residual->data_ptr<float>() : nullptr;
  auto grad_x = at::empty_like(x);
  // A fixed number of row blocks, not one per thread: the same bits on any number of threads.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(32, rows));
  auto partial = at::zeros({blocks, C}, x.options());
  const float *g = grad.data_ptr<float>(), *in = x.data_ptr<float>(), *w = weight.contiguous().data_ptr<float>();
  const float* rs = rstd.data_ptr<float>();
  float *gx = grad_x.data_ptr<float>(), *pw = partial.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* acc = pw + b * C;
      for (int64_t n = rows * b / blocks; n < rows * (b + 1) / blocks; ++n) {
        const float *gr = g + n * C, *row = in + n * C;
        const float r = rs[n];
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; ++c) dot += gr[c] * w[c] * row[c];
        const float coef = dot * r * r / C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          gx[n * C + c] = r * (gr[c] * w[c] - row[c] * coef);
          acc[c] += gr[c] * row[c] * r;
        }
        if (res) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gx[n * C + c] += res[n * C + c];
        }
      }
    }
  });
  return {grad_x, partial.sum(0)};
}

// sigmoid(a) through exp of a non-positive argument (no overflow either side).
inline float sigmoid(float a) {
  const float e = exp_nonpositive(a >= 0.f ? -a : a);
  const float one_over = 1.f / (1.f + e);
  return a >= 0.f ? one_over : e * one_over;
}

at::Tensor swiglu(const at::Tensor& gate_up) {
  check_float_cpu(gate_up, "swiglu: gate_up");
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "swiglu: gate_up's width must be even");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto out = at::empty(sizes, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float *gate = in + n * 2 * I, *up = gate + I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) o[n * I + i] = gate[i] * sigmoid(gate[i]) * up[i];
    }
  });
  return out;
}

// d gate = grad up silu'(gate), silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))); d up = grad silu(gate),
// into out (N, 2I), which may be gate_up itself: each element is read before its place is written.
void swiglu_backward_into(const at::Tensor& grad, const at::Tensor& gate_up, at::Tensor& out) {
  check_float_cpu(grad, "swiglu_backward: grad");
  check_float_cpu(gate_up, "swiglu_backward: gate_up");
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  TORCH_CHECK(grad.numel() == rows * I, "swiglu_backward: grad must be gate_up's rows by half its width");
  const float *g = grad.data_ptr<float>(), *in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float *gate = in + n * 2 * I, *up = gate + I, *gr = g + n * I;
      float *d_gate = o + n * 2 * I, *d_up = d_gate + I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float a = gate[i], u = up[i], sg = sigmoid(a);
        d_up[i] = gr[i] * a * sg;
        d_gate[i] = gr[i] * u * sg * (1.f + a * (1.f - sg));
      }
    }
  });
}

at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& gate_up) {
  auto out = at::empty_like(gate_up);
  swiglu_backward_into(grad, gate_up, out);
  return out;
}

// The same, written over gate_up (training's backward, gate_up needed no more): no new tensor of
// its size to fill, and its rows written while they are in cache from being read.
at::Tensor& swiglu_backward_(const at::Tensor& grad, at::Tensor& gate_up) {
  swiglu_backward_into(grad, gate_up, gate_up);
  return gate_up;
}

}  // namespace
}  // namespace lmforge

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("rotary(Tensor x, Tensor cos, Tensor signed_sin, bool backward) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd, Tensor? grad_residual=None) "
        "-> (Tensor, Tensor)");
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate_up) -> Tensor");
  m.def("swiglu_backward_(Tensor grad, Tensor(a!) gate_up) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("rotary", &lmforge::rotary);
  m.impl("rms_norm", &lmforge::rms_norm);
  m.impl("rms_norm_backward", &lmforge::rms_norm_backward);
  m.impl("swiglu", &lmforge::swiglu);
  m.impl("swiglu_backward", &lmforge::swiglu_backward);
  m.impl("swiglu_backward_", &lmforge::swiglu_backward_);
}

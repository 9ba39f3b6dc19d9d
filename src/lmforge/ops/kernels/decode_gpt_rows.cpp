// A GPT's whole decode step for a few rows, float32 on a CPU, in one call: the embeddings, every
// block (this library's decode attention in the middle) and the output layer, with plain loops
// for the rest. A step of a few rows is matrix-vector products that stream every weight through
// the caches once; what else it does is a few dozen small operators, and after the weights have
// swept the caches, each of torch's (dispatch, allocation, iteration set-up) runs from cold code
// at several times its warm cost. Here the step's own code and buffers stay small.
//
// The numbers are the forward's up to float rounding (the products sum in another order than the
// BLAS's), not bit for bit: tests/models/test_gpt_decode_rows.py holds them to 1e-5.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "blas.h"
#include "decode.h"

namespace lmforge {
namespace {

constexpr int LANES = 16;
typedef float Lanes __attribute__((vector_size(LANES * sizeof(float))));  // the compiler's widest fit
typedef float Half __attribute__((vector_size(LANES / 2 * sizeof(float))));
typedef float Quarter __attribute__((vector_size(LANES / 4 * sizeof(float))));

inline Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// n < LANES floats from p, zeros after them.
inline Lanes load_part(const float* p, int64_t n) {
  float part[LANES] = {};
  std::copy(p, p + n, part);
  return load(part);
}

// The lanes' sum as a tree: halves, quarters, then pairs.
inline float lane_sum(Lanes v) {
  Half lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  const Half h = lo + hi;
  Quarter a, b;
  std::memcpy(&a, &h, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&h) + sizeof a, sizeof b);
  const Quarter q = a + b;
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// Dot products of ROWS rows of x with four weight rows, each summed in the same order whatever
// ROWS is (lane j adds the terms i = j mod LANES, then `lane_sum`), so a row's numbers do not
// depend on the rows computed beside it.
template <int ROWS>
inline void dots4(const float* x, int64_t I, const float* w, float (*out)[4]) {
  Lanes acc[ROWS][4] = {};
  auto add = [&](const Lanes* ws, auto x_lanes) {
    for (int r = 0; r < ROWS; ++r) {
      const Lanes xr = x_lanes(r);
      acc[r][0] += ws[0] * xr, acc[r][1] += ws[1] * xr, acc[r][2] += ws[2] * xr, acc[r][3] += ws[3] * xr;
    }
  };
  int64_t i = 0;
  for (; i + LANES <= I; i += LANES) {
    const Lanes ws[4] = {load(w + i), load(w + I + i), load(w + 2 * I + i), load(w + 3 * I + i)};
    add(ws, [&](int r) { return load(x + r * I + i); });
  }
  if (const int64_t n = I - i) {  // the last lanes, zeros beyond the row
    const Lanes ws[4] = {load_part(w + i, n), load_part(w + I + i, n), load_part(w + 2 * I + i, n),
                         load_part(w + 3 * I + i, n)};
    add(ws, [&](int r) { return load_part(x + r * I + i, n); });
  }
  for (int r = 0; r < ROWS; ++r)
    for (int k = 0; k < 4; ++k) out[r][k] = lane_sum(acc[r][k]);
}

// Output (r, o) of a projection: residual + bias + the product's sum (residual, bias may be null).
inline void finish(float* y, const float* residual, const float* bias, int64_t O, int64_t r, int64_t o, float dot) {
  y[r * O + o] = (residual ? residual[r * O + o] : 0.f) + (bias ? bias[o] : 0.f) + dot;
}

// y[r, o] = residual[r, o] + bias[o] + sum_i x[r, i] W[o, i] for r < R, o < O; W (O, I) row-major;
// residual and bias may be null, and residual may be y itself (x may not).
void affine_rows(const float* x, int64_t R, int64_t I, const float* W, const float* bias, int64_t O,
                 const float* residual, float* y) {
  const int64_t padded = (O + 3) / 4 * 4;  // a last partial block runs on a copy of its rows
  std::vector<float> last(O % 4 ? 4 * I : 0, 0.f);
  if (O % 4) std::copy(W + (O / 4 * 4) * I, W + O * I, last.begin());
  // Four weight rows at a time, each read once from memory for all R rows.
  at::parallel_for(0, padded / 4, 32, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin * 4; o < end * 4; o += 4) {
      const float* w = o + 4 <= O ? W + o * I : last.data();
      const int64_t n = std::min<int64_t>(4, O - o);
      for (int64_t r = 0; r < R; r += 4) {  // up to four rows by four outputs: a load feeds four products
        float dots[4][4];
        switch (std::min<int64_t>(4, R - r)) {
          case 1: dots4<1>(x + r * I, I, w, dots); break;
          case 2: dots4<2>(x + r * I, I, w, dots); break;
          case 3: dots4<3>(x + r * I, I, w, dots); break;
          default: dots4<4>(x + r * I, I, w, dots);
        }
        for (int64_t a = 0; a < std::min<int64_t>(4, R - r); ++a)
          for (int64_t k = 0; k < n; ++k) finish(y, residual, bias, O, r + a, o + k, dots[a][k]);
      }
    }
  });
}

// ROWS rows of x against a block of 4 LANES outputs of Wt (I, O) row-major: out[r][j] sums
// x[r, i] Wt[i, o + j] over i in order, one fused multiply-add after another.
template <int ROWS>
inline void outer_block(const float* x, int64_t I, const float* Wt, int64_t O, float (*out)[4 * LANES]) {
  Lanes acc[ROWS][4] = {};
  for (int64_t i = 0; i < I; ++i) {
    const float* w = Wt + i * O;
    if (i + 4 < I)  // rows of Wt lie O apart, too far for the hardware to guess: ask four rows ahead
      for (int k = 0; k < 4; ++k) __builtin_prefetch(w + 4 * O + k * LANES, 0, 3);
    const Lanes w0 = load(w), w1 = load(w + LANES), w2 = load(w + 2 * LANES), w3 = load(w + 3 * LANES);
    for (int r = 0; r < ROWS; ++r) {
      const float xi = x[r * I + i];
      acc[r][0] += xi * w0, acc[r][1] += xi * w1, acc[r][2] += xi * w2, acc[r][3] += xi * w3;
    }
  }
  for (int r = 0; r < ROWS; ++r) std::memcpy(out[r], acc[r], sizeof acc[r]);
}

// affine_rows with the weight stored transposed, Wt (I, O) row-major: blocks of up to four rows by
// 4 LANES outputs held in registers, no lanes to sum. Every output sums its terms in the order of i
// with the same vector operations whatever R is (the last, partial block runs on a zero-padded
// copy of its columns), so a row's numbers do not depend on the rows beside it.
void affine_rows_t(const float* x, int64_t R, int64_t I, const float* Wt, const float* bias, int64_t O,
                   const float* residual, float* y) {
  constexpr int64_t BLOCK = 4 * LANES;
  const int64_t full = O / BLOCK * BLOCK;
  std::vector<float> tail(full < O ? I * BLOCK : 0, 0.f);
  for (int64_t i = 0; full < O && i < I; ++i) std::copy(Wt + i * O + full, Wt + (i + 1) * O, tail.data() + i * BLOCK);
  at::parallel_for(0, (O + BLOCK - 1) / BLOCK, 8, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin * BLOCK; o < std::min(end * BLOCK, O); o += BLOCK) {
      const float* w = o < full ? Wt + o : tail.data();
      const int64_t stride = o < full ? O : BLOCK, n = std::min(BLOCK, O - o);
      for (int64_t r = 0; r < R; r += 4) {
        float dots[4][BLOCK];
        const int64_t rows = std::min<int64_t>(4, R - r);
        switch (rows) {
          case 1: outer_block<1>(x + r * I, I, w, stride, dots); break;
          case 2: outer_block<2>(x + r * I, I, w, stride, dots); break;
          case 3: outer_block<3>(x + r * I, I, w, stride, dots); break;
          default: outer_block<4>(x + r * I, I, w, stride, dots);
        }
        for (int64_t a = 0; a < rows; ++a)
          for (int64_t k = 0; k < n; ++k) finish(y, residual, bias, O, r + a, o + k, dots[a][k]);
      }
    }
  });
}

// A weight (O, I) as the kernel reads it: row-major, or stored transposed ((I, O) memory).
struct Weight {
  const float* data;
  bool transposed;
};

Weight weight_of(const at::Tensor& t) {
  return {t.data_ptr<float>(), !t.is_contiguous()};
}

void project(const float* x, int64_t R, int64_t I, Weight w, const float* bias, int64_t O, const float* residual,
             float* y) {
  if (w.transposed)
    affine_rows_t(x, R, I, w.data, bias, O, residual, y);
  else
    affine_rows(x, R, I, w.data, bias, O, residual, y);
}

// out = (x - mean) / sqrt(var + eps) * weight + bias, row by row over C values (bias may be null).
void layer_norm_rows(const float* x, int64_t R, int64_t C, const float* weight, const float* bias, float eps,
                     float* out) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * C;
    float sum = 0.f, squares = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < C; ++i) sum += xr[i];
    const float mean = sum / static_cast<float>(C);
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < C; ++i) squares += (xr[i] - mean) * (xr[i] - mean);
    const float rstd = 1.f / std::sqrt(squares / static_cast<float>(C) + eps);
    float* o = out + r * C;
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) o[i] = (xr[i] - mean) * rstd * weight[i] + (bias ? bias[i] : 0.f);
  }
}

// erf(x) as Abramowitz and Stegun's 7.1.26 (absolute error under 1.5e-7) on this library's
// exponential, written so that a loop of it turns into vector code (the C library's erf does not).
inline float erf_vector(float x) {
  const float a = x < 0.f ? -x : x, t = 1.f / (1.f + 0.3275911f * a);
  const float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  const float y = 1.f - poly * exp_nonpositive(-a * a);
  return x < 0.f ? -y : y;
}

// tanh(x) = (1 - e) / (1 + e) with e = exp(-2 |x|), the sign put back.
inline float tanh_vector(float x) {
  const float e = exp_nonpositive(-2.f * (x < 0.f ? -x : x)), y = (1.f - e) / (1.f + e);
  return x < 0.f ? -y : y;
}

// In place: 0 = exact GELU, 1 = GPT-2's tanh GELU, 2 = ReLU.
void activate(float* x, int64_t n, int64_t activation) {
  if (activation == 0) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.f + erf_vector(x[i] * static_cast<float>(M_SQRT1_2)));
  } else if (activation == 1) {
    const float c = std::sqrt(2.f / static_cast<float>(M_PI));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.f + tanh_vector(c * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] > 0.f ? x[i] : 0.f;
  }
}

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "decode_gpt_rows: ",
              what, " must be contiguous float32 on a CPU");
}

// A projection's weight (O, I): contiguous, or stored transposed (strides (1, O): (I, O) memory).
void check_weight(const at::Tensor& t, const char* what) {
  const bool transposed = t.dim() == 2 && t.stride(0) == 1 && t.stride(1) == t.size(0);
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && (t.is_contiguous() || transposed),
              "decode_gpt_rows: ", what, " must be float32 on a CPU, contiguous or stored transposed");
}

// The shapes of one block's parts: ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj as (weight, bias).
void check_block(const std::vector<std::optional<at::Tensor>>& p, int64_t C, int64_t F) {
  const int64_t rows[6] = {C, 3 * C, C, C, F, C}, cols[6] = {0, C, C, 0, C, F};
  for (int i = 0; i < 6; ++i) {
    TORCH_CHECK(p[2 * i].has_value(), "decode_gpt_rows: weight ", i, " of a block is missing");
    if (cols[i] == 0)
      check_float(*p[2 * i], "every norm weight");
    else
      check_weight(*p[2 * i], "every projection weight");
    const bool shaped = cols[i] == 0 ? p[2 * i]->dim() == 1 && p[2 * i]->size(0) == rows[i]
                                     : p[2 * i]->dim() == 2 && p[2 * i]->size(0) == rows[i] &&
                                           p[2 * i]->size(1) == cols[i];
    TORCH_CHECK(shaped, "decode_gpt_rows: weight ", i, " of a block has the wrong shape");
    if (p[2 * i + 1].has_value()) {
      check_float(*p[2 * i + 1], "every bias");
      TORCH_CHECK(p[2 * i + 1]->numel() == rows[i], "decode_gpt_rows: bias ", i, " of a block has the wrong size");
    }
  }
}

// (R,) int64 values of an optional index tensor, each checked to lie in [0, limit); null when absent.
const int64_t* indices_of(const std::optional<at::Tensor>& t, int64_t R, int64_t limit, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == R && t->is_contiguous(),
              "decode_gpt_rows: ", what, " must be contiguous int64 (", R, ",)");
  const int64_t* data = t->data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(data[r] >= 0 && data[r] < limit, "decode_gpt_rows: ", what, " ", data[r], " at ", r,
                " is outside [0, ", limit, ")");
  return data;
}

// The shapes, types and ranges `decode_gpt_rows` reads (its blocks' tensors aside: `check_block`).
void check_step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& wte, const at::Tensor& wpe,
                const at::Tensor& ln_f_weight, const std::optional<at::Tensor>& ln_f_bias, const at::Tensor& lm_head,
                const std::optional<at::Tensor>& mask, const at::Tensor& k_cache, const at::Tensor& v_cache,
                int64_t start, int64_t n_head, int64_t activation, bool rows_share_slots) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&wte, &wpe, &ln_f_weight, &k_cache, &v_cache})
    check_float(*t, "every tensor");
  check_weight(lm_head, "the output layer's weight");
  TORCH_CHECK(ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && ids.dim() == 1 &&
                  positions.sizes() == ids.sizes() && ids.is_contiguous() && positions.is_contiguous(),
              "decode_gpt_rows: ids and positions must be contiguous int64 (R,)");
  TORCH_CHECK(activation >= 0 && activation <= 2, "decode_gpt_rows: activation must be 0, 1 or 2");
  const int64_t R = ids.size(0), V = wte.size(0), C = wte.size(1);
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes() && R >= 1 &&
                  (R <= k_cache.size(1) || rows_share_slots) && k_cache.size(2) == n_head &&
                  n_head * k_cache.size(4) == C,
              "decode_gpt_rows: the caches must be (n_layer, slots >= R, n_head, columns, C / n_head)");
  TORCH_CHECK(start >= 0 && start < k_cache.size(3), "decode_gpt_rows: column ", start, " is outside the cache");
  TORCH_CHECK(wpe.dim() == 2 && wpe.size(1) == C && lm_head.dim() == 2 && lm_head.size(1) == C &&
                  ln_f_weight.numel() == C && (!ln_f_bias.has_value() || ln_f_bias->numel() == C),
              "decode_gpt_rows: the embeddings, final norm and output layer must be C wide");
  if (ln_f_bias.has_value()) check_float(*ln_f_bias, "every tensor");
  if (mask.has_value()) {  // rows may lie apart (a view of a wider mask), each row's values together
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kFloat && mask->dim() == 2 &&
                    mask->size(0) == R && mask->size(1) == start + 1 && mask->stride(1) == 1 &&
                    (R == 1 || mask->stride(0) >= start + 1),
                "decode_gpt_rows: the mask must be float32 (R, start + 1) = (", R, ", ", start + 1,
                ") with each row's values contiguous");
  }
  const int64_t *id = ids.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(id[r] >= 0 && id[r] < V && pos[r] >= 0 && pos[r] < wpe.size(0), "decode_gpt_rows: row ", r,
                " has a token id or position outside the embeddings");
}

// Logits of token ids[r] at position positions[r] of each row r < R. parts: 12 tensors per
// block (`check_block`); the caches (n_layer, slots, n_head, columns, hs), row r writing cache row
// slots[r] (default r) at column columns[r] (default `start`, the largest) and attending over its
// columns up to that one; mask: additive (R, start + 1), its rows possibly apart, or none;
// activation as `activate`. The logits (L, V) are those of the rows logit_rows (default all R):
// the rows of a prompt joining a step share its cache row, and only its last needs them.
at::Tensor decode_gpt_rows(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& wte,
                           const at::Tensor& wpe, const c10::List<std::optional<at::Tensor>>& parts,
                           const at::Tensor& ln_f_weight, const std::optional<at::Tensor>& ln_f_bias,
                           const at::Tensor& lm_head, const std::optional<at::Tensor>& mask, at::Tensor& k_cache,
                           at::Tensor& v_cache, int64_t start, int64_t n_head, double eps, int64_t activation,
                           const std::optional<at::Tensor>& slots_of_rows,
                           const std::optional<at::Tensor>& columns_of_rows,
                           const std::optional<at::Tensor>& logit_rows) {
  check_step(ids, positions, wte, wpe, ln_f_weight, ln_f_bias, lm_head, mask, k_cache, v_cache, start, n_head,
             activation, slots_of_rows.has_value());
  const int64_t R = ids.size(0), C = wte.size(1), layers = k_cache.size(0);
  const int64_t slots = k_cache.size(1), columns = k_cache.size(3), hs = k_cache.size(4);
  const int64_t* row_slots = indices_of(slots_of_rows, R, slots, "slots");
  const int64_t* row_columns = indices_of(columns_of_rows, R, start + 1, "columns");
  const int64_t* logit_row = logit_rows.has_value() ? indices_of(logit_rows, logit_rows->numel(), R, "logit_rows")
                                                    : nullptr;
  const int64_t L = logit_row != nullptr ? logit_rows->numel() : R;
  TORCH_CHECK(L >= 1, "decode_gpt_rows: logit_rows is empty");
  TORCH_CHECK(static_cast<int64_t>(parts.size()) == 12 * layers,
              "decode_gpt_rows: parts must hold 12 tensors per block");
  std::vector<std::vector<std::optional<at::Tensor>>> blocks(layers);
  for (int64_t l = 0; l < layers; ++l) {
    for (int i = 0; i < 12; ++i) blocks[l].push_back(parts.get(12 * l + i));
    TORCH_CHECK(blocks[l][8].has_value() && blocks[l][8]->dim() == 2, "decode_gpt_rows: c_fc's weight is missing");
    check_block(blocks[l], C, blocks[l][8]->size(0));
  }
  const int64_t F = layers ? blocks[0][8]->size(0) : 0;
  const int64_t *id = ids.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();

  std::vector<float> x(R * C), h(R * C), qkv(R * 3 * C), att(R * C), f(R * std::max<int64_t>(F, C));
  const float *te = wte.data_ptr<float>(), *pe = wpe.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < C; ++i) x[r * C + i] = te[id[r] * C + i] + pe[pos[r] * C + i];
  const float e = static_cast<float>(eps);
  const int64_t mask_stride = mask.has_value() ? mask->stride(0) : 0;
  for (int64_t l = 0; l < layers; ++l) {
    const auto& p = blocks[l];
    const int64_t Fl = p[8]->size(0);
    TORCH_CHECK(Fl == F, "decode_gpt_rows: every block must have the same MLP width");
    layer_norm_rows(x.data(), R, C, p[0]->data_ptr<float>(), data_or_null(p[1]), e, h.data());
    project(h.data(), R, C, weight_of(*p[2]), data_or_null(p[3]), 3 * C, nullptr, qkv.data());
    const int64_t layer = l * slots * n_head * columns * hs;
    attend_new_position({qkv.data(), 3 * C, nullptr, nullptr, 1, data_or_null(mask), mask_stride,
                         k_cache.data_ptr<float>() + layer, v_cache.data_ptr<float>() + layer, columns, start, n_head,
                         n_head, hs, row_slots, row_columns},
                        R, att.data());
    project(att.data(), R, C, weight_of(*p[4]), data_or_null(p[5]), C, x.data(), x.data());
    layer_norm_rows(x.data(), R, C, p[6]->data_ptr<float>(), data_or_null(p[7]), e, h.data());
    project(h.data(), R, C, weight_of(*p[8]), data_or_null(p[9]), F, nullptr, f.data());
    activate(f.data(), R * F, activation);
    project(f.data(), R, F, weight_of(*p[10]), data_or_null(p[11]), C, x.data(), x.data());
  }
  if (logit_row != nullptr)  // the rows that need logits, gathered to the front
    for (int64_t i = 0; i < L; ++i) std::copy_n(x.data() + logit_row[i] * C, C, h.data() + i * C);
  layer_norm_rows(logit_row != nullptr ? h.data() : x.data(), L, C, ln_f_weight.data_ptr<float>(),
                  data_or_null(ln_f_bias), e, f.data());
  auto logits = at::empty({L, lm_head.size(0)}, wte.options());
  project(f.data(), L, C, weight_of(lm_head), nullptr, lm_head.size(0), nullptr, logits.data_ptr<float>());
  return logits;
}

}  // namespace
}  // namespace lmforge

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("decode_gpt_rows(Tensor ids, Tensor positions, Tensor wte, Tensor wpe, Tensor?[] parts, Tensor ln_f_weight, "
        "Tensor? ln_f_bias, Tensor lm_head, Tensor? mask, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, "
        "int n_head, float eps, int activation, Tensor? slots=None, Tensor? columns=None, Tensor? logit_rows=None) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("decode_gpt_rows", &lmforge::decode_gpt_rows); }

// One decode step's attention, float32 on a CPU: from the q | k | v projection's rows
// (B, (nh + 2 nkv) hs) written at cache column `start` to the attention's output rows
// (B, nh hs), in one call where torch's ops take about fifteen (split, views, two cache writes,
// the attention and its reshapes, and a Llama's rotary). The new key and value are written
// into the layer's cache buffers (B, nkv, max_len, hs) at `start`; each query head (scaled by
// 1 / sqrt(hs)) reads the keys 0 .. start of its group's head.
//
// `decode_attention_masked`: q and k turned by the rotary angles of one position (1, hs) or of
// each row's own (B, hs), where given (a Llama; a GPT has none: nkv = nh, learned positions), and
// an optional additive mask (B, start + 1) over each row's keys (0 or -inf, a batch whose rows own
// different cache columns); a masked key gets exactly no weight. `decode_gpt_block` is a whole GPT block's step around it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "blas.h"
#include "decode.h"

namespace lmforge {
namespace {

inline void turn_row(float* out, const float* x, const float* c, const float* s, int64_t hs, float scale) {
  const int64_t half = hs / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i] = (x[i] * c[i] + x[i + half] * s[i]) * scale;
#pragma omp simd
  for (int64_t i = half; i < hs; ++i) out[i] = (x[i] * c[i] + x[i - half] * s[i]) * scale;
}

inline void scale_row(float* out, const float* x, int64_t hs, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < hs; ++i) out[i] = x[i] * scale;
}

// softmax(q . k_t + mask_t) over t < keys, then sum_t p_t v_t into y; mask may be null.
void attend_one(float* y, const float* q, const float* K, const float* V, int64_t keys, int64_t hs,
                float* scores, const float* mask) {
  for (int64_t t = 0; t < keys; ++t) {
    const float* k = K + t * hs;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < hs; ++d) dot += q[d] * k[d];
    scores[t] = dot;
  }
  if (mask != nullptr) {
#pragma omp simd
    for (int64_t t = 0; t < keys; ++t) scores[t] += mask[t];
  }
  const float shift = max_of(scores, keys);
#pragma omp simd
  for (int64_t t = 0; t < keys; ++t) scores[t] = exp_nonpositive(scores[t] - shift);
  if (mask != nullptr) {  // the exponential stops at exp(-87.3), not 0: a masked key gets none at all
    constexpr float hidden = -std::numeric_limits<float>::infinity();
#pragma omp simd
    for (int64_t t = 0; t < keys; ++t) scores[t] = mask[t] == hidden ? 0.f : scores[t];
  }
  // One key after another in column order (not in vector lanes): the same bits with a mask or
  // without, and whatever masked columns lie between a row's keys.
  float sum = 0.f;
  for (int64_t t = 0; t < keys; ++t) sum += scores[t];
  std::fill(y, y + hs, 0.f);
  for (int64_t t = 0; t < keys; ++t) {
    if (scores[t] == 0.f) continue;
    const float p = scores[t] / sum, *v = V + t * hs;
#pragma omp simd
    for (int64_t d = 0; d < hs; ++d) y[d] += p * v[d];
  }
}

// How many leading columns of a row's mask hide their key: the row's own columns start after
// them (a batch's timeline is wider than any one row's), so its attention need not read them.
// A row that hides every column reads them all, as before.
int64_t hidden_prefix(const float* mask, int64_t keys) {
  if (mask == nullptr) return 0;
  constexpr float hidden = -std::numeric_limits<float>::infinity();
  int64_t first = 0;
  while (first < keys && mask[first] == hidden) ++first;
  return first < keys ? first : 0;
}

}  // namespace

void attend_new_position(const NewPosition& a, int64_t B, float* out) {
  const int64_t D = a.head_dim, KV = a.n_kv_head, L = a.columns, n_head = a.n_head;
  const int64_t g = n_head / KV, widest = a.start + 1;
  const bool turn = a.cos != nullptr;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  auto slot = [&](int64_t b) { return a.slot == nullptr ? b : a.slot[b]; };
  auto column = [&](int64_t b) { return a.column == nullptr ? a.start : a.column[b]; };
  auto angles = [&](const float* table, int64_t b) { return turn ? table + (b % a.angle_rows) * D : nullptr; };
  // Every row's key and value written first: the rows of a prompt joining the step read each
  // other's (each up to its own column).
  at::parallel_for(0, B * KV, 64, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, j = task % KV, at = column(b) * D;
      const float* row = a.qkv + b * a.width;
      float *K = a.k + (slot(b) * KV + j) * L * D, *V = a.v + (slot(b) * KV + j) * L * D;
      if (turn)
        turn_row(K + at, row + (n_head + j) * D, angles(a.cos, b), angles(a.sin, b), D, 1.f);
      else
        std::copy(row + (n_head + j) * D, row + (n_head + j + 1) * D, K + at);
      std::copy(row + (n_head + KV + j) * D, row + (n_head + KV + j + 1) * D, V + at);
    }
  });
  // Then one task per (row, key / value head): its group's queries over columns 0 .. its own.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, widest * D * g));
  at::parallel_for(0, B * KV, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(widest), q(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, j = task % KV, keys = column(b) + 1;
      const float *row = a.qkv + b * a.width, *row_mask = a.mask == nullptr ? nullptr : a.mask + b * a.mask_stride;
      const int64_t first = hidden_prefix(row_mask, keys);
      const float *K = a.k + (slot(b) * KV + j) * L * D, *V = a.v + (slot(b) * KV + j) * L * D;
      for (int64_t i = 0; i < g; ++i) {
        const int64_t h = j * g + i;
        if (turn)
          turn_row(q.data(), row + h * D, angles(a.cos, b), angles(a.sin, b), D, scale);
        else
          scale_row(q.data(), row + h * D, D, scale);
        // the hidden prefix skipped: its keys would weigh exactly 0, so the same bits
        attend_one(out + b * n_head * D + h * D, q.data(), K + first * D, V + first * D, keys - first, D,
                   scores.data(), row_mask == nullptr ? nullptr : row_mask + first);
      }
    }
  });
}

namespace {

at::Tensor step_attention(const at::Tensor& qkv, const std::optional<at::Tensor>& cos,
                          const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& mask,
                          at::Tensor& k_cache, at::Tensor& v_cache, int64_t start, int64_t n_head) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&qkv, &k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "decode_attention: every tensor must be contiguous float32 on a CPU");
  for (const std::optional<at::Tensor>* t : {&cos, &sin, &mask})
    TORCH_CHECK(!t->has_value() || ((*t)->device().is_cpu() && (*t)->scalar_type() == at::kFloat &&
                                    (*t)->is_contiguous()),
                "decode_attention: every tensor must be contiguous float32 on a CPU");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "decode_attention: the caches must be (B, n_kv_head, max_len, head_dim)");
  const int64_t B = k_cache.size(0), KV = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(n_head > 0 && n_head % KV == 0, "decode_attention: n_head must be a multiple of n_kv_head");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == B && qkv.size(1) == (n_head + 2 * KV) * D,
              "decode_attention: qkv must be (B, (n_head + 2 n_kv_head) head_dim)");
  const bool turn = cos.has_value();
  TORCH_CHECK(turn == sin.has_value(), "decode_attention: give both cos and sin, or neither");
  const int64_t angle_rows = turn ? cos->size(0) : 1;
  TORCH_CHECK(!turn || (D % 2 == 0 && cos->dim() == 2 && cos->size(1) == D && sin->sizes() == cos->sizes() &&
                        (angle_rows == 1 || angle_rows == B)),
              "decode_attention: cos / sin must be (1, hs) or one position per row (B, hs)");
  TORCH_CHECK(start >= 0 && start < L, "decode_attention: position ", start, " is outside the cache of ", L);
  const int64_t width = qkv.size(1), keys = start + 1;
  TORCH_CHECK(!mask.has_value() || mask->numel() == B * keys,
              "decode_attention: the mask must hold (B, start + 1) = (", B, ", ", keys, ") values, not ",
              mask->numel());
  auto out = at::empty({B, n_head * D}, qkv.options());
  attend_new_position({qkv.data_ptr<float>(), width, turn ? cos->data_ptr<float>() : nullptr,
                       turn ? sin->data_ptr<float>() : nullptr, angle_rows,
                       mask.has_value() ? mask->data_ptr<float>() : nullptr, keys, k_cache.data_ptr<float>(),
                       v_cache.data_ptr<float>(), L, start, n_head, KV, D},
                      B, out.data_ptr<float>());
  return out;
}

// The MLP's activation as models/activations.py names it: 0 = exact GELU, 1 = tanh GELU, 2 = ReLU.
at::Tensor activate(const at::Tensor& f, int64_t activation) {
  return activation == 0 ? at::gelu(f) : activation == 1 ? at::gelu(f, "tanh") : at::relu(f);
}

// residual + x W^T (+ b), as ops.linear.add_projection writes it for rows.
at::Tensor add_projection(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return at::addmm(residual, x, weight.t());
  return at::add(residual, *bias).addmm_(x, weight.t());
}

// A GPT block's decode step on rows x (B, C), one call instead of a dozen from Python: the same
// ATen operators models/gpt.py's `block` calls on rows (so the same numbers), with this file's
// attention in the middle. parts: ln_1 (weight, bias), c_attn, attn_proj, ln_2, c_fc, mlp_proj
// (weight (out, in), bias), each bias optional; activation 0 = exact GELU, 1 = tanh GELU, 2 = ReLU.
at::Tensor decode_gpt_block(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& parts,
                            const std::optional<at::Tensor>& mask, at::Tensor& k_cache, at::Tensor& v_cache,
                            int64_t start, int64_t n_head, double eps, int64_t activation) {
  TORCH_CHECK(parts.size() == 12, "decode_gpt_block: parts must be 6 (weight, bias) pairs, not ", parts.size(),
              " tensors");
  TORCH_CHECK(x.dim() == 2, "decode_gpt_block: x must be rows (B, C)");
  TORCH_CHECK(activation >= 0 && activation <= 2, "decode_gpt_block: activation must be 0, 1 or 2");
  std::vector<std::optional<at::Tensor>> p;
  for (size_t i = 0; i < parts.size(); ++i) p.push_back(parts.get(i));
  for (int i = 0; i < 12; i += 2) TORCH_CHECK(p[i].has_value(), "decode_gpt_block: weight ", i / 2, " is missing");
  const int64_t C = x.size(1);
  auto h = at::layer_norm(x, {C}, p[0], p[1], eps);
  auto qkv = at::linear(h, *p[2], p[3]).contiguous();  // (B, 3C)
  auto y = step_attention(qkv, std::nullopt, std::nullopt, mask, k_cache, v_cache, start, n_head);  // (B, C)
  auto mid = add_projection(x, y, *p[4], p[5]);
  h = at::layer_norm(mid, {C}, p[6], p[7], eps);
  auto f = at::linear(h, *p[8], p[9]);  // (B, ffn)
  f = activate(f, activation);
  return add_projection(mid, f, *p[10], p[11]);
}

// A GPT block over a prompt's positions x (B, T, C) written into the cache at `start`: the ATen
// operators models/gpt.py's `block` calls there, in its order (the same numbers), as one call:
// a prefill takes the interpreter's lock once per layer instead of at each of some fifteen
// operators, which matters when the server's event loop wants it at the same time.
at::Tensor prefill_gpt_block(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& parts,
                             const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& k_cache,
                             at::Tensor& v_cache, int64_t start, int64_t n_head, double eps, int64_t activation) {
  TORCH_CHECK(parts.size() == 12, "prefill_gpt_block: parts must be 6 (weight, bias) pairs");
  TORCH_CHECK(x.dim() == 3 && n_head > 0 && x.size(2) % n_head == 0, "prefill_gpt_block: x must be (B, T, C)");
  TORCH_CHECK(activation >= 0 && activation <= 2, "prefill_gpt_block: activation must be 0, 1 or 2");
  TORCH_CHECK(k_cache.dim() == 4 && start >= 0 && start + x.size(1) <= k_cache.size(2),
              "prefill_gpt_block: the positions must fit the cache");
  std::vector<std::optional<at::Tensor>> p;
  for (size_t i = 0; i < parts.size(); ++i) p.push_back(parts.get(i));
  for (int i = 0; i < 12; i += 2) TORCH_CHECK(p[i].has_value(), "prefill_gpt_block: weight ", i / 2, " is missing");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  auto h = at::layer_norm(x, {C}, p[0], p[1], eps);
  auto qkv = at::linear(h, *p[2], p[3]).view({B, T, 3, n_head, C / n_head}).permute({2, 0, 3, 1, 4}).unbind(0);
  k_cache.narrow(2, start, T).copy_(qkv[1]);
  v_cache.narrow(2, start, T).copy_(qkv[2]);
  auto y = at::scaled_dot_product_attention(qkv[0], k_cache.narrow(2, 0, start + T), v_cache.narrow(2, 0, start + T),
                                            mask, 0.0, is_causal);  // (B, nh, T, hs)
  y = y.transpose(1, 2).reshape({B, T, C});
  auto mid = add_projection(x.reshape({B * T, C}), y.reshape({B * T, C}), *p[4], p[5]).view({B, T, C});
  h = at::layer_norm(mid, {C}, p[6], p[7], eps);
  auto f = at::linear(h, *p[8], p[9]);  // (B, T, ffn)
  f = activate(f, activation);
  return add_projection(mid.reshape({B * T, C}), f.reshape({B * T, f.size(2)}), *p[10], p[11]).view({B, T, C});
}

}  // namespace
}  // namespace lmforge

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("decode_attention_masked(Tensor qkv, Tensor? cos, Tensor? signed_sin, Tensor? mask, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int start, int n_head) -> Tensor");
  m.def("decode_gpt_block(Tensor x, Tensor?[] parts, Tensor? mask, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int start, int n_head, float eps, int activation) -> Tensor");
  m.def("prefill_gpt_block(Tensor x, Tensor?[] parts, Tensor? mask, bool is_causal, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int start, int n_head, float eps, int activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("decode_attention_masked", &lmforge::step_attention);
  m.impl("decode_gpt_block", &lmforge::decode_gpt_block);
  m.impl("prefill_gpt_block", &lmforge::prefill_gpt_block);
}

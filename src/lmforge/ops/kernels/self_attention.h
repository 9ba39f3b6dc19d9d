// The pieces of the self-attention kernel (self_attention.cpp) that describe its inputs: the
// qkv layout, which keys each query sees, attention dropout, rotary tables, the stacking of a
// group's query heads, and where the forward keeps probabilities for the backward.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "blas.h"

namespace lmforge {
namespace attention {

constexpr int64_t kRowBlock = 64;  // 32 was as fast, 128 about 15% slower (T = 256, hs = 64)
// The query heads of a key / value group share its keys and values: a pass stacks the row
// blocks of up to this many rows' worth of them into one product (larger products run nearer
// the BLAS's peak; beyond two blocks the scores outgrow the cache).
constexpr int64_t kStackRows = 2 * kRowBlock;

inline int64_t heads_per_pass(int64_t group) { return std::clamp<int64_t>(kStackRows / kRowBlock, 1, group); }

struct Shape {
  int64_t B, T, H, KV, D, C, ld;  // C = H D, the output's width; ld = (H + 2 KV) D, the input's
  Shape(const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head)
      : B(qkv.size(0)), T(qkv.size(1)), H(n_head), KV(n_kv_head), D(qkv.size(2) / (n_head + 2 * n_kv_head)),
        C(H * D), ld(qkv.size(2)) {}
  int64_t key_offset(int64_t kv_head) const { return C + kv_head * D; }  // from the row's start
  int64_t value_offset(int64_t kv_head) const { return C + (KV + kv_head) * D; }
};

// n_kv_head 0 stands for n_head (one key / value head per query head).
inline int64_t kv_heads(int64_t n_head, int64_t n_kv_head) { return n_kv_head == 0 ? n_head : n_kv_head; }

// Which keys each query sees: 0 .. i (causal) and only the first `length` keys of its row.
struct Visibility {
  bool causal;
  std::vector<int64_t> lengths;  // per batch row, in 1 .. T (a row of padding only sees key 0)
  Visibility(bool causal_, const std::optional<at::Tensor>& key_lengths, int64_t B, int64_t T)
      : causal(causal_), lengths(B, T) {
    if (!key_lengths) return;
    const at::Tensor l = key_lengths->to(at::kLong).contiguous();
    TORCH_CHECK(l.numel() == B, "self_attention: key_lengths must have one entry per batch row");
    const int64_t* data = l.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) lengths[b] = std::clamp<int64_t>(data[b], 1, T);
  }
  int64_t seen(int64_t b, int64_t i) const { return causal ? std::min(i + 1, lengths[b]) : lengths[b]; }
  int64_t block_keys(int64_t b, int64_t i0, int64_t rows) const { return seen(b, i0 + rows - 1); }
};

// Attention dropout: probabilities are kept with probability 1 - p and then scaled by 1 / (1 - p).
struct Dropout {
  bool on;
  uint64_t seed;
  uint32_t threshold;
  float scale;
  Dropout(double p, int64_t seed_)
      : on(p > 0), seed(static_cast<uint64_t>(seed_)),
        threshold(static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0))),
        scale(static_cast<float>(1.0 / (1.0 - p))) {}
  // The keep factors of query row i of (batch, head) pair bh, for its first n keys.
  void factors(float* out, int64_t n, int64_t bh, int64_t T, int64_t i) const {
    dropout_factors(out, n, row_salt(seed, static_cast<uint64_t>(bh * T + i)), threshold, scale);
  }
};

// Rows of one head: row t at p + t * ld.
struct Rows {
  const float* p;
  int64_t ld;
};
struct MutRows {
  float* p;
  int64_t ld;
};

// Rotary angles for q and k, as cos and signed sin tables (T, hs), or none.
struct Rope {
  const float *cos = nullptr, *sin = nullptr;
  int64_t D = 0;
  Rope(const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& s, const Shape& shape) {
    TORCH_CHECK(c.has_value() == s.has_value(), "self_attention: give both rotary tables or neither");
    if (!c) return;
    for (const at::Tensor* t : {&*c, &*s})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) == shape.T && t->size(1) == shape.D && shape.D % 2 == 0,
                  "self_attention: rotary tables must be contiguous float32 (T, hs), hs even");
    cos = c->data_ptr<float>();
    sin = s->data_ptr<float>();
    D = shape.D;
  }
  bool on() const { return cos != nullptr; }
  // Rows t0 .. t0 + n of a head turned into dst (n, hs), or as they are without tables.
  Rows turned(float* dst, Rows src, int64_t t0, int64_t n) const {
    if (!on()) return {src.p + t0 * src.ld, src.ld};
    for (int64_t t = t0; t < t0 + n; ++t) turn(dst + (t - t0) * D, src.p + t * src.ld, cos + t * D, sin + t * D, D);
    return {dst, D};
  }
  // Gradients of turned rows t0 .. t0 + n (n, hs) turned back into those rows of dst.
  void back(MutRows dst, const float* src, int64_t t0, int64_t n) const {
    for (int64_t t = t0; t < t0 + n; ++t)
      turn_back(dst.p + t * dst.ld, src + (t - t0) * D, cos + t * D, sin + t * D, D);
  }
};

// Rows t0 .. t0 + n of `heads` adjacent heads of hs channels (head g at src.p + g hs) as one
// (heads n, hs) matrix in dst, head after head, turned by `rope` where it has tables. One head
// without tables is read where it is.
inline Rows stacked(float* dst, Rows src, int64_t heads, int64_t hs, int64_t t0, int64_t n, const Rope* rope) {
  if (heads == 1 && rope == nullptr) return {src.p + t0 * src.ld, src.ld};
  for (int64_t g = 0; g < heads; ++g) {
    const Rows head{src.p + g * hs, src.ld};
    if (rope != nullptr) {
      rope->turned(dst + g * n * hs, head, t0, n);
      continue;
    }
    for (int64_t t = 0; t < n; ++t) std::copy_n(head.p + (t0 + t) * head.ld, hs, dst + (g * n + t) * hs);
  }
  return {dst, hs};
}

// The inverse: a stacked (heads n, hs) matrix into rows t0 .. t0 + n of the heads at dst.p +
// g hs, turned back by `rope` where it has tables (src then being gradients of turned rows).
inline void unstack(MutRows dst, const float* src, int64_t heads, int64_t hs, int64_t t0, int64_t n, const Rope* rope) {
  for (int64_t g = 0; g < heads; ++g) {
    const MutRows head{dst.p + g * hs, dst.ld};
    if (rope != nullptr) {
      rope->back(head, src + g * n * hs, t0, n);
      continue;
    }
    for (int64_t t = 0; t < n; ++t) std::copy_n(src + (g * n + t) * hs, hs, head.p + (t0 + t) * head.ld);
  }
}

// Where the forward keeps the probabilities for the backward: per (batch, query head) a region
// holding each row block at its widest (rows x the keys its last row can see), and a pass's
// stacked block of `heads` heads at `heads` times its offset in the region of its first head.
struct KeptProbs {
  float* data = nullptr;
  int64_t per_head = 0, H = 0;
  std::vector<int64_t> offsets;  // per row block
  // probs: resized here (forward) or checked (backward) to B nh per_head floats.
  KeptProbs(const std::optional<at::Tensor>& probs, const Shape& s, bool causal, double dropout_p, bool resize)
      : H(s.H) {
    if (!probs) return;
    TORCH_CHECK(dropout_p == 0, "self_attention: probabilities are kept only without dropout");
    for (int64_t i0 = 0; i0 < s.T; i0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, s.T - i0);
      offsets.push_back(per_head);
      per_head += rows * (causal ? i0 + rows : s.T);
    }
    at::Tensor kept = *probs;
    TORCH_CHECK(kept.device().is_cpu() && kept.scalar_type() == at::kFloat,
                "self_attention: probs must be a float32 CPU tensor");
    if (resize) kept.resize_({s.B * s.H * per_head});
    TORCH_CHECK(kept.is_contiguous() && kept.numel() == s.B * s.H * per_head,
                "self_attention_backward: probs is not what the forward kept for this shape");
    data = kept.data_ptr<float>();
  }
  bool on() const { return data != nullptr; }
  float* block(int64_t b, int64_t h0, int64_t heads, int64_t i0) const {
    return data + (b * H + h0) * per_head + heads * offsets[i0 / kRowBlock];
  }
};

inline void check(const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head, double dropout_p) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 3 && qkv.is_contiguous(),
              "self_attention: qkv must be a contiguous float32 CPU tensor (B, T, (nh + 2 nkv) hs)");
  TORCH_CHECK(n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0,
              "self_attention: n_head must be a positive multiple of n_kv_head");
  TORCH_CHECK(qkv.size(2) % (n_head + 2 * n_kv_head) == 0,
              "self_attention: qkv's width is not a multiple of n_head + 2 n_kv_head");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "self_attention: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(has_blas(), "self_attention: torch was built without a BLAS these kernels can call");
}

}  // namespace attention
}  // namespace lmforge

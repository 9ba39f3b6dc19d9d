// Self-attention for float32 on a CPU, forward and backward, straight from the (B, T, 3C) output
// of the qkv projection to the (B, T, C) input of the output projection: no (B, nh, T, hs)
// copies either way. With n_kv_head < n_head (grouped-query attention) the input is
// (B, T, (nh + 2 nkv) hs), query head h reading key / value head h / (nh / nkv): the shared heads
// are read where they are, and the backward sums a group's key / value gradients as it goes.
// Given rotary tables (a Llama's q and k straight from their projection), each head's queries
// and keys are turned into scratch as a task reads them, and their gradients turned back as it
// writes them: no turned copy of q | k | v is made or kept. Causal (GPT) or not (BERT), with right padding given as each row's number
// of real keys. One (batch, head) pair per task; within it, 64-query row blocks see only the
// keys up to their last query (causal) or the real keys, so the products skip the masked
// part, and a block's scores (64 x T) stay in cache from the product through the softmax to
// the next product.
// The forward keeps the log-sum-exp of each row. Given a `probs` tensor (without dropout), it
// also writes each block's probabilities there instead of into scratch, and the backward reads
// them back; otherwise the backward recomputes them (one product and one exponential per block
// more), and regenerates the dropout mask from its seed (blas.h: dropout_factors).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "blas.h"
#include "self_attention.h"

namespace lmforge {
namespace {

using namespace attention;

// Row r of a block's scores (its first `seen` keys visible, `keys` wide) made probabilities in
// place, dropped out with `keep` scratch; returns the row's log-sum-exp.
float softmax_row(float* row, int64_t seen, int64_t keys, const Dropout& dropout, float* keep, int64_t bh,
                  int64_t T, int64_t i) {
  const float peak = max_of(row, seen);
  const float sum = exp_shifted(row, seen, peak);
  const float inv = 1.f / sum;
  if (dropout.on) {
    dropout.factors(keep, seen, bh, T, i);
#pragma omp simd
    for (int64_t c = 0; c < seen; ++c) row[c] *= inv * keep[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < seen; ++c) row[c] *= inv;
  }
  std::fill(row + seen, row + keys, 0.f);
  return peak + std::log(sum);
}

// (out, lse): out (B, T, C) = dropout(softmax(q k^T / sqrt(hs) over the visible keys)) v per
// head; lse (B, nh, T). One (batch, key / value head) pair per task: its group's query heads
// in passes of heads_per_pass, a pass's row blocks stacked into one product.
std::tuple<at::Tensor, at::Tensor> self_attention(const at::Tensor& qkv, int64_t n_head, bool causal,
                                                  const std::optional<at::Tensor>& key_lengths, double dropout_p,
                                                  int64_t seed, int64_t n_kv_head, const std::optional<at::Tensor>& cos,
                                                  const std::optional<at::Tensor>& signed_sin,
                                                  const std::optional<at::Tensor>& probs) {
  n_kv_head = kv_heads(n_head, n_kv_head);
  check(qkv, n_head, n_kv_head, dropout_p);
  const Shape s(qkv, n_head, n_kv_head);
  const Visibility visible(causal, key_lengths, s.B, s.T);
  const Dropout dropout(dropout_p, seed);
  const Rope rope(cos, signed_sin, s);
  const KeptProbs kept(probs, s, causal, dropout_p, true);
  auto out = at::empty({s.B, s.T, s.C}, qkv.options());
  auto lse = at::empty({s.B, s.H, s.T}, qkv.options());
  if (out.numel() == 0) return {out, lse};
  const float scale = 1.f / std::sqrt(static_cast<float>(s.D));
  const float* qkv_data = qkv.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  float* lse_data = lse.data_ptr<float>();
  const int64_t ld = s.ld, group = s.H / s.KV, per = heads_per_pass(group), M = per * kRowBlock;
  const Rope* turn = rope.on() ? &rope : nullptr;
  at::parallel_for(0, s.B * s.KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kept.on() ? 0 : M * s.T), keep(dropout.on ? s.T : 0);
    std::vector<float> turned_k(rope.on() ? s.T * s.D : 0), queries(M * s.D), outs(per > 1 ? M * s.D : 0);
    for (int64_t bj = begin; bj < end; ++bj) {
      const int64_t b = bj / s.KV, j = bj % s.KV;
      const float* row0 = qkv_data + b * s.T * ld;
      const Rows K = rope.turned(turned_k.data(), {row0 + s.key_offset(j), ld}, 0, s.T);
      const float* V = row0 + s.value_offset(j);
      for (int64_t h0 = j * group; h0 < (j + 1) * group; h0 += per) {
        const int64_t heads = std::min(per, (j + 1) * group - h0);
        float* O = out_data + b * s.T * s.C + h0 * s.D;
        for (int64_t i0 = 0; i0 < s.T; i0 += kRowBlock) {
          const int64_t rows = std::min(kRowBlock, s.T - i0), keys = visible.block_keys(b, i0, rows);
          const Rows Q = stacked(queries.data(), {row0 + h0 * s.D, ld}, heads, s.D, i0, rows, turn);
          float* S = kept.on() ? kept.block(b, h0, heads, i0) : scores.data();
          mm(false, true, heads * rows, keys, s.D, scale, Q.p, Q.ld, K.p, K.ld, 0.f, S, keys);
          for (int64_t g = 0; g < heads; ++g) {
            const int64_t bh = b * s.H + h0 + g;
            for (int64_t r = 0; r < rows; ++r)
              lse_data[bh * s.T + i0 + r] = softmax_row(S + (g * rows + r) * keys, visible.seen(b, i0 + r), keys,
                                                        dropout, keep.data(), bh, s.T, i0 + r);
          }
          if (heads == 1) {
            mm(false, false, rows, s.D, keys, 1.f, S, keys, V, ld, 0.f, O + i0 * s.C, s.C);
          } else {
            mm(false, false, heads * rows, s.D, keys, 1.f, S, keys, V, ld, 0.f, outs.data(), s.D);
            unstack({O, s.C}, outs.data(), heads, s.D, i0, rows, nullptr);
          }
        }
      }
    }
  });
  return {out, lse};
}

// A pass of `heads` query heads of one key / value group through the backward: dQ of their
// rows, and dK, dV of their key / value head set (the task's first pass: beta 0) or added to.
// Their row blocks are stacked as in the forward. Scratch: two stacked blocks of scores, the
// heads' T rowsums, and stacked queries, output gradients and query gradients.
struct GroupBackward {
  const Shape& s;
  const Visibility& visible;
  const Dropout& dropout;
  const Rope* rope;
  const KeptProbs& kept;
  float scale;
  std::vector<float> probs, grad_scores, out_dot_grad, keep, dropped, queries, grad_outs, grad_q;
  GroupBackward(const Shape& s_, const Visibility& v, const Dropout& d, const Rope& r, const KeptProbs& k,
                int64_t per)
      : s(s_), visible(v), dropout(d), rope(r.on() ? &r : nullptr), kept(k),
        scale(1.f / std::sqrt(static_cast<float>(s_.D))), probs(k.on() ? 0 : per * kRowBlock * s_.T),
        grad_scores(per * kRowBlock * s_.T), out_dot_grad(per * s_.T),
        keep(d.on ? per * kRowBlock * s_.T : 0), dropped(d.on ? per * kRowBlock * s_.T : 0),
        queries(per * kRowBlock * s_.D), grad_outs(per * kRowBlock * s_.D), grad_q(per * kRowBlock * s_.D) {}

  // Softmax backward: dS = P * (dP - rowsum(P * dP)), and rowsum(P * dP) = rowsum(dO * O), with
  // or without dropout (dP being the gradient of the probabilities before dropout).
  void rowsums(const float* O, const float* dO, int64_t heads) {
    const int64_t C = s.C, D = s.D;  // locals: read through `s`, the loop was compiled to gathers
    for (int64_t g = 0; g < heads; ++g)
      for (int64_t i = 0; i < s.T; ++i) {
        const float *gr = dO + i * C + g * D, *o = O + i * C + g * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += gr[d] * o[d];
        out_dot_grad[g * s.T + i] = dot;
      }
  }

  // The forward's probabilities of a stacked block (heads rows, keys) recomputed into P from
  // its scores, with the dropped ones (what multiplied V) beside them; returns those.
  const float* probabilities(float* P, int64_t b, int64_t bh0, int64_t heads, int64_t i0, int64_t rows,
                             int64_t keys, const float* L) {
    for (int64_t g = 0; g < heads; ++g)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = (g * rows + r) * keys, seen = visible.seen(b, i0 + r);
        float* row = P + at;
        exp_shifted(row, seen, L[g * s.T + i0 + r]);
        std::fill(row + seen, row + keys, 0.f);
        if (!dropout.on) continue;
        float *k = keep.data() + at, *pd = dropped.data() + at;
        dropout.factors(k, seen, bh0 + g, s.T, i0 + r);
        std::fill(k + seen, k + keys, 0.f);
#pragma omp simd
        for (int64_t j = 0; j < keys; ++j) pd[j] = row[j] * k[j];
      }
    return dropout.on ? dropped.data() : P;
  }

  // Heads h0 .. h0 + heads of batch row b: Q, O, dO, L and dQ at head h0 (the others follow).
  void run(int64_t b, int64_t h0, int64_t heads, bool first, Rows Q, Rows K, Rows V, const float* O,
           const float* dO, const float* L, MutRows dQ, MutRows dK, MutRows dV) {
    rowsums(O, dO, heads);
    // The last row block reaches every key its row sees: going backwards from it, its products set
    // dK and dV (the task's first pass) and the earlier blocks add to them.
    const int64_t last = ((s.T - 1) / kRowBlock) * kRowBlock, bh0 = b * s.H + h0;
    for (int64_t i0 = last; i0 >= 0; i0 -= kRowBlock) {
      const int64_t rows = std::min(kRowBlock, s.T - i0), keys = visible.block_keys(b, i0, rows), n = heads * rows;
      const float beta = first && i0 == last ? 0.f : 1.f;
      const Rows Qi = stacked(queries.data(), Q, heads, s.D, i0, rows, rope);
      const Rows dOi = stacked(grad_outs.data(), {dO, s.C}, heads, s.D, i0, rows, nullptr);
      float *P = kept.on() ? kept.block(b, h0, heads, i0) : probs.data(), *dS = grad_scores.data();
      if (!kept.on()) mm(false, true, n, keys, s.D, scale, Qi.p, Qi.ld, K.p, K.ld, 0.f, P, keys);
      const float* P_used = kept.on() ? P : probabilities(P, b, bh0, heads, i0, rows, keys, L);
      mm(true, false, keys, s.D, n, 1.f, P_used, keys, dOi.p, dOi.ld, beta, dV.p, dV.ld);
      mm(false, true, n, keys, s.D, 1.f, dOi.p, dOi.ld, V.p, V.ld, 0.f, dS, keys);
      for (int64_t g = 0; g < heads; ++g)
        for (int64_t r = 0; r < rows; ++r) {
          const float* p = P + (g * rows + r) * keys;
          float* grad = dS + (g * rows + r) * keys;
          const float dot = out_dot_grad[g * s.T + i0 + r];
          if (dropout.on) {
            const float* k = keep.data() + (g * rows + r) * keys;
#pragma omp simd
            for (int64_t j = 0; j < keys; ++j) grad[j] = p[j] * (grad[j] * k[j] - dot);
          } else {
#pragma omp simd
            for (int64_t j = 0; j < keys; ++j) grad[j] = p[j] * (grad[j] - dot);
          }
        }
      if (heads == 1 && rope == nullptr) {
        mm(false, false, rows, s.D, keys, scale, dS, keys, K.p, K.ld, 0.f, dQ.p + i0 * dQ.ld, dQ.ld);
      } else {
        mm(false, false, n, s.D, keys, scale, dS, keys, K.p, K.ld, 0.f, grad_q.data(), s.D);
        unstack(dQ, grad_q.data(), heads, s.D, i0, rows, rope);
      }
      mm(true, false, keys, s.D, n, scale, dS, keys, Qi.p, Qi.ld, beta, dK.p, dK.ld);
    }
  }
};

// d loss / d qkv (same layout as qkv) from d loss / d out (B, T, C); the other arguments as in
// the forward. One (batch, key / value head) pair per task: its group's query heads in passes.
at::Tensor self_attention_backward(const at::Tensor& grad_out_any, const at::Tensor& qkv, const at::Tensor& out,
                                   const at::Tensor& lse, int64_t n_head, bool causal,
                                   const std::optional<at::Tensor>& key_lengths, double dropout_p, int64_t seed,
                                   int64_t n_kv_head, const std::optional<at::Tensor>& cos,
                                   const std::optional<at::Tensor>& signed_sin,
                                   const std::optional<at::Tensor>& probs) {
  n_kv_head = kv_heads(n_head, n_kv_head);
  check(qkv, n_head, n_kv_head, dropout_p);
  const at::Tensor grad_out = grad_out_any.contiguous();
  const Shape s(qkv, n_head, n_kv_head);
  const Visibility visible(causal, key_lengths, s.B, s.T);
  const Dropout dropout(dropout_p, seed);
  const Rope rope(cos, signed_sin, s);
  const KeptProbs kept(probs, s, causal, dropout_p, false);
  auto grad_qkv = at::empty_like(qkv);
  if (grad_qkv.numel() == 0) return grad_qkv;
  const float* qkv_data = qkv.data_ptr<float>();
  const float* out_data = out.data_ptr<float>();
  const float* grad_out_data = grad_out.data_ptr<float>();
  const float* lse_data = lse.data_ptr<float>();
  float* grad_data = grad_qkv.data_ptr<float>();
  const int64_t ld = s.ld, group = s.H / s.KV, per = heads_per_pass(group), turned = rope.on() ? s.T * s.D : 0;
  at::parallel_for(0, s.B * s.KV, 1, [&](int64_t begin, int64_t end) {
    GroupBackward pass(s, visible, dropout, rope, kept, per);
    std::vector<float> turned_k(turned), grad_k(turned), grad_v(s.T * s.D);
    for (int64_t bj = begin; bj < end; ++bj) {
      const int64_t b = bj / s.KV, j = bj % s.KV;
      const float* row0 = qkv_data + b * s.T * ld;
      float* grad0 = grad_data + b * s.T * ld;
      const Rows K = rope.turned(turned_k.data(), {row0 + s.key_offset(j), ld}, 0, s.T);
      const MutRows dK = rope.on() ? MutRows{grad_k.data(), s.D} : MutRows{grad0 + s.key_offset(j), ld};
      const MutRows dV{grad_v.data(), s.D};  // summed in cache over the group, written once
      for (int64_t t = visible.lengths[b]; t < s.T; ++t) {  // keys no query sees get zeros
        std::fill(dK.p + t * dK.ld, dK.p + t * dK.ld + s.D, 0.f);
        std::fill(dV.p + t * dV.ld, dV.p + t * dV.ld + s.D, 0.f);
      }
      for (int64_t h0 = j * group; h0 < (j + 1) * group; h0 += per) {
        const int64_t o = b * s.T * s.C + h0 * s.D;
        pass.run(b, h0, std::min(per, (j + 1) * group - h0), h0 == j * group, {row0 + h0 * s.D, ld}, K,
                 {row0 + s.value_offset(j), ld}, out_data + o, grad_out_data + o, lse_data + (b * s.H + h0) * s.T,
                 {grad0 + h0 * s.D, ld}, dK, dV);
      }
      if (rope.on()) rope.back({grad0 + s.key_offset(j), ld}, grad_k.data(), 0, s.T);
      for (int64_t t = 0; t < s.T; ++t) std::copy_n(dV.p + t * s.D, s.D, grad0 + s.value_offset(j) + t * ld);
    }
  });
  return grad_qkv;
}

// The dropout factors (0 or 1 / (1 - p)) the kernels use for (B * nh, T, T) score rows: for
// tests and for checking the mask's statistics.
at::Tensor attention_dropout_factors(int64_t batch_heads, int64_t T, double dropout_p, int64_t seed) {
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "attention_dropout_factors: dropout_p must be in [0, 1)");
  const Dropout dropout(dropout_p, seed);
  auto factors = at::empty({batch_heads, T, T}, at::kFloat);
  float* data = factors.data_ptr<float>();
  for (int64_t bh = 0; bh < batch_heads; ++bh)
    for (int64_t i = 0; i < T; ++i) dropout.factors(data + (bh * T + i) * T, T, bh, T, i);
  return factors;
}

}  // namespace
}  // namespace lmforge

// Schemas here, kernels registered for the CPU key, so the dispatcher (and profilers or
// dispatch modes) sees them as operators.
TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("self_attention(Tensor qkv, int n_head, bool causal, Tensor? key_lengths, float dropout_p, int seed, "
        "int n_kv_head=0, Tensor? cos=None, Tensor? signed_sin=None, Tensor(a!)? probs=None) -> (Tensor, Tensor)");
  m.def("self_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int n_head, bool causal, "
        "Tensor? key_lengths, float dropout_p, int seed, int n_kv_head=0, Tensor? cos=None, "
        "Tensor? signed_sin=None, Tensor? probs=None) -> Tensor");
  m.def("attention_dropout_factors(int batch_heads, int T, float dropout_p, int seed) -> Tensor",
        &lmforge::attention_dropout_factors);
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("self_attention", &lmforge::self_attention);
  m.impl("self_attention_backward", &lmforge::self_attention_backward);
}

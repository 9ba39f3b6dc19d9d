// The row pass of the fused output layer (lmforge/ops/lm_loss.py) for float32 logits on a
// CPU: per row, the target's logit, the maximum, then exp(logit - maximum) in place and its sum.
// One read and one write of each row while it sits in cache, where torch's ops make four passes.
// With subtract_target, the sum is also taken off the target's place (E - sum onehot): the row
// scaled by 1 / sum is then the logits' whole gradient, target term included, and the products
// that follow need no separate pass for it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "blas.h"

namespace lmforge {
namespace {

void softmax_rows_(at::Tensor& logits, const at::Tensor& targets, at::Tensor& target_logit, at::Tensor& row_max,
                   at::Tensor& sum_exp, bool subtract_target) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "softmax_rows_: logits must be a float32 CPU matrix with contiguous rows");
  const int64_t n = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.numel() == n && targets.is_contiguous(),
              "softmax_rows_: targets must be n contiguous int64 indices");
  for (const at::Tensor* t : {&target_logit, &row_max, &sum_exp})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == n && t->is_contiguous(),
                "softmax_rows_: outputs must be n contiguous float32 values");
  if (n == 0 || vocab == 0) return;
  float* data = logits.data_ptr<float>();
  const int64_t* index = targets.data_ptr<int64_t>();
  float *target_out = target_logit.data_ptr<float>(), *max_out = row_max.data_ptr<float>();
  float* sum_out = sum_exp.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = data + i * stride;
      const int64_t t = index[i];
      TORCH_CHECK(t >= 0 && t < vocab, "softmax_rows_: target ", t, " is outside the vocabulary of ", vocab);
      target_out[i] = row[t];
      max_out[i] = max_of(row, vocab);
      sum_out[i] = exp_shifted(row, vocab, max_out[i]);
      if (subtract_target) row[t] -= sum_out[i];
    }
  });
}

}  // namespace
}  // namespace lmforge

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("softmax_rows_(Tensor(a!) logits, Tensor targets, Tensor(b!) target_logit, Tensor(c!) row_max, "
        "Tensor(d!) sum_exp, bool subtract_target=False) -> ()");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("softmax_rows_", &lmforge::softmax_rows_); }

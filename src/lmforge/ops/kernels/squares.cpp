// The sum of squares of many float32 tensors (a step's gradients, for their global norm), on
// all threads at once: torch's _foreach_norm walks the tensors one after another on one thread.
// The elements are cut into fixed blocks, each summed in double, and the blocks' sums added in
// order: the same bits on any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace lmforge {
namespace {

constexpr int64_t kBlock = 1 << 16;  // elements per block: 256 KiB, large enough to stream

double block_squares(const float* x, int64_t n) {
  double acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
#pragma omp simd
    for (int64_t k = 0; k < 16; ++k) acc[k] += static_cast<double>(x[i + k]) * x[i + k];
  double sum = 0;
  for (; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  for (int64_t k = 0; k < 16; ++k) sum += acc[k];
  return sum;
}

// A 0-dim float64 tensor: the sum over every element of every tensor of its square.
at::Tensor sum_of_squares(at::TensorList tensors) {
  struct Block {
    const float* start;
    int64_t n;
  };
  std::vector<Block> blocks;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "sum_of_squares: every tensor must be a contiguous float32 CPU tensor");
    const float* p = t.data_ptr<float>();
    for (int64_t at = 0; at < t.numel(); at += kBlock) blocks.push_back({p + at, std::min(kBlock, t.numel() - at)});
  }
  std::vector<double> sums(blocks.size());
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) sums[b] = block_squares(blocks[b].start, blocks[b].n);
  });
  double total = 0;
  for (double s : sums) total += s;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace
}  // namespace lmforge

TORCH_LIBRARY_FRAGMENT(lmforge, m) { m.def("sum_of_squares(Tensor[] tensors) -> Tensor"); }

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("sum_of_squares", &lmforge::sum_of_squares); }

// A float32 matrix's transpose as a new contiguous matrix, in cache-sized tiles: torch's copy of
// a transposed view walks one side with a stride of a whole row and runs several times slower.
// A layer's weight gradient computed in its faster orientation (ops/product.py) comes back to
// the weight's layout through it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace lmforge {
namespace {

constexpr int64_t kTile = 16;  // a tile's rows of 16 floats: one 64-byte cache line each

at::Tensor transposed(const at::Tensor& a) {
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && a.dim() == 2 && a.is_contiguous(),
              "transposed: a must be a contiguous float32 CPU matrix");
  const int64_t R = a.size(0), C = a.size(1);
  auto out = at::empty({C, R}, a.options());
  if (out.numel() == 0) return out;
  const float* src = a.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // Each task writes whole rows of the output (tiles of kTile columns of a), reading kTile
  // lines of a per tile.
  at::parallel_for(0, (C + kTile - 1) / kTile, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin * kTile; c0 < std::min(C, end * kTile); c0 += kTile) {
      const int64_t columns = std::min(kTile, C - c0);
      for (int64_t r0 = 0; r0 < R; r0 += kTile) {
        const int64_t rows = std::min(kTile, R - r0);
        for (int64_t c = 0; c < columns; ++c) {
          float* to = dst + (c0 + c) * R + r0;
          const float* from = src + r0 * C + c0 + c;
#pragma omp simd
          for (int64_t r = 0; r < rows; ++r) to[r] = from[r * C];
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace lmforge

TORCH_LIBRARY_FRAGMENT(lmforge, m) { m.def("transposed(Tensor a) -> Tensor"); }

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("transposed", &lmforge::transposed); }

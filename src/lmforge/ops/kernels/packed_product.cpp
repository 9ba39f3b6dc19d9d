// A float32 matrix packed once into the BLAS's internal layout as the right operand of several
// products: MKL's sgemm otherwise copies (packs) its operands at every call, and a product
// repeated over blocks of rows against one weight (the fused output layer's logits and input
// gradient) copies that whole weight again for each block.
//
// The packed tensor starts with a header (rows, n, k), 64 bytes so the packed data stays as
// aligned as the tensor; products check their operands against it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

// MKL's packed-gemm API, weak like sgemm_ (blas.h): a torch whose BLAS lacks it still loads
// this library, and has_packed_products() says so.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace lmforge {
namespace {

// MKL's CBLAS enumerations.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kBMatrix = 162, kPacked = 151;
constexpr int64_t kHeaderFloats = 16;  // (rows, n, k) as int64, padded to 64 bytes

bool has_packed_products() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

void check_matrix(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1, what,
              " must be a float32 CPU matrix with contiguous rows");
}

// B (k, n) = w^T for w (n, k) when transposed, else w itself (k, n), packed for products with
// `rows`-row left operands.
at::Tensor pack_right_operand(const at::Tensor& w, bool transposed, int64_t rows) {
  TORCH_CHECK(has_packed_products(), "pack_right_operand: torch's BLAS has no packed products");
  check_matrix(w, "pack_right_operand: w");
  const int64_t n = transposed ? w.size(0) : w.size(1), k = transposed ? w.size(1) : w.size(0);
  TORCH_CHECK(rows > 0 && n > 0 && k > 0 && rows <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX,
              "pack_right_operand: rows and w's sizes must be positive and fit the BLAS's 32-bit sizes");
  const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, rows, n, k);
  auto packed = at::empty({kHeaderFloats + static_cast<int64_t>((bytes + 3) / 4)}, w.options());
  int64_t* header = reinterpret_cast<int64_t*>(packed.data_ptr<float>());
  header[0] = rows, header[1] = n, header[2] = k;
  cblas_sgemm_pack(kRowMajor, kBMatrix, transposed ? kTrans : kNoTrans, rows, n, k, 1.f, w.data_ptr<float>(),
                   w.stride(0), packed.data_ptr<float>() + kHeaderFloats);
  return packed;
}

// out (rows, n) = a (rows, k) @ B, B as packed by pack_right_operand.
at::Tensor& packed_product_out(const at::Tensor& a, const at::Tensor& packed, at::Tensor& out) {
  check_matrix(a, "packed_product_out: a");
  check_matrix(out, "packed_product_out: out");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kFloat && packed.dim() == 1 &&
                  packed.is_contiguous() && packed.numel() > kHeaderFloats,
              "packed_product_out: packed must come from pack_right_operand");
  TORCH_CHECK(has_packed_products(), "packed_product_out: torch's BLAS has no packed products");
  const int64_t* header = reinterpret_cast<const int64_t*>(packed.data_ptr<float>());
  const int64_t rows = header[0], n = header[1], k = header[2];
  const bool sizes_fit = rows > 0 && n > 0 && k > 0 && rows <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX;
  TORCH_CHECK(sizes_fit && packed.numel() >= kHeaderFloats + static_cast<int64_t>(
                                                  cblas_sgemm_pack_get_size(kBMatrix, rows, n, k) / 4),
              "packed_product_out: packed must come from pack_right_operand");
  TORCH_CHECK(a.size(0) == rows && a.size(1) == k && out.size(0) == rows && out.size(1) == n,
              "packed_product_out: a must be (", rows, ", ", k, ") and out (", rows, ", ", n, ") for this packing");
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, rows, n, k, a.data_ptr<float>(), a.stride(0),
                      packed.data_ptr<float>() + kHeaderFloats, n, 0.f, out.data_ptr<float>(), out.stride(0));
  return out;
}

}  // namespace
}  // namespace lmforge

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("has_packed_products() -> bool", [] { return lmforge::has_packed_products(); });
  m.def("pack_right_operand(Tensor w, bool transposed, int rows) -> Tensor");
  m.def("packed_product_out(Tensor a, Tensor packed, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("pack_right_operand", &lmforge::pack_right_operand);
  m.impl("packed_product_out", &lmforge::packed_product_out);
}

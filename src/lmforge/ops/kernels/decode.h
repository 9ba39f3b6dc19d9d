// What the decode kernels share: the attention of one new position per row over its KV cache.
#pragma once

#include <cstdint>

namespace lmforge {

// One decode step's attention inputs, as raw float32 buffers.
struct NewPosition {
  const float* qkv;   // (B, width): each row's q | k | v projection, width = (n_head + 2 n_kv_head) head_dim
  int64_t width;
  const float* cos;   // rotary angles (angle_rows, head_dim), or null (no rotary)
  const float* sin;
  int64_t angle_rows;  // 1 (every row at one position) or B
  const float* mask;  // additive, start + 1 values per row, mask_stride apart; or null
  int64_t mask_stride;
  float* k;           // the layer's caches (slots, n_kv_head, columns, head_dim), rows contiguous
  float* v;
  int64_t columns, start, n_head, n_kv_head, head_dim;
  const int64_t* slot = nullptr;    // each row's cache row (null: row b is cache row b)
  const int64_t* column = nullptr;  // each row's column, at most start (null: start for every row)
};

// Writes each row's new key and value at its column (`start`) of its cache row, then each query
// head (scaled by 1 / sqrt(head_dim)) attends over columns 0 .. that column: out (B, n_head
// head_dim). Rows may share a cache row at different columns (a prompt's positions, joining a
// step): every row's key and value is written before any row attends.
void attend_new_position(const NewPosition& step, int64_t B, float* out);

}  // namespace lmforge

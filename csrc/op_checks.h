// Argument checks, allocation and dispatch helpers shared by the CPU and CUDA op
// implementations.
// (The Python layer validates user input first; these guard direct torch.ops calls.)
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <vector>

namespace mutex_attn {

inline void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "mutex_attn: ", name, " must be 4-D [N, C, H, W], got ", t.sizes());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  check_4d(a, na);
  check_4d(b, nb);
  TORCH_CHECK(a.sizes() == b.sizes(), "mutex_attn: ", na, " and ", nb,
              " must have the same shape, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "mutex_attn: ", na, " and ", nb,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "mutex_attn: ", na, " and ", nb,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// Ops that take a softmax or a max over a row need at least one position in it.
inline void check_positions(int64_t rows, int64_t positions, const char* op) {
  TORCH_CHECK(positions > 0 || rows == 0, "mutex_attn: ", op, " needs H·W >= 1");
}

// The dtype of row statistics and accumulation: float64 for float64 inputs, else float32.
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-row input ([N, C], or [N, C, last]) in the compute dtype, made contiguous.
inline at::Tensor row_tensor(const at::Tensor& t, const at::Tensor& like, at::ScalarType dtype,
                             const char* name, int64_t last = 0) {
  std::vector<int64_t> expected{like.size(0), like.size(1)};
  if (last) expected.push_back(last);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), "mutex_attn: ", name, " must have shape ",
              at::IntArrayRef(expected), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "mutex_attn: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "mutex_attn: ", name, " must be on ", like.device(),
              ", got ", t.device());
  return t.contiguous();
}

// Every op runs for float64, float32, float16 and bfloat16.
#define MA_DISPATCH(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), name, __VA_ARGS__)

// Typed data pointers of inputs and outputs.
template <typename T>
const T* in(const at::Tensor& t) { return t.const_data_ptr<T>(); }
template <typename T>
T* out(at::Tensor& t) { return t.mutable_data_ptr<T>(); }

// A new per-row output ([N, C], or [N, C, last]).
inline at::Tensor per_row(const at::Tensor& like, at::ScalarType dtype, int64_t last = 0) {
  std::vector<int64_t> shape{like.size(0), like.size(1)};
  if (last) shape.push_back(last);
  return at::empty(shape, like.options().dtype(dtype));
}

// Registers every op's kernel under its schema name (csrc/mutex_attn.cpp); each backend's
// file defines functions of these names, so CPU and CUDA cannot drift apart.
#define MUTEX_ATTN_IMPL_ALL_OPS(m)                                              \
  m.impl("mab_forward", &mab_forward);                                          \
  m.impl("mab_backward", &mab_backward);                                        \
  m.impl("fab_pool", &fab_pool);                                                \
  m.impl("fab_pool_backward", &fab_pool_backward);                              \
  m.impl("fab_blend", &fab_blend);                                              \
  m.impl("fab_blend_backward", &fab_blend_backward);                            \
  m.impl("mutex_attention_stats", &mutex_attention_stats);                      \
  m.impl("mutex_attention_apply", &mutex_attention_apply);                      \
  m.impl("mutex_attention_backward_stats", &mutex_attention_backward_stats);    \
  m.impl("mutex_attention_backward_apply", &mutex_attention_backward_apply)

}  // namespace mutex_attn

// CPU kernels of the mutex_attn ops: the op glue (argument checks, allocation, dtype dispatch,
// at::parallel_for over rows) around the row kernels of row_kernels.h, which do the work one
// row (sample, channel) at a time, with accumulation in float (double for double inputs).
//
// The fused MutexAttention ops read channels_last in place and write channels_last outputs;
// the MAB and FAB piece ops make inputs of any layout NCHW-contiguous first and write NCHW. Each row is reduced in one fixed order, so results do
// not depend on the thread count: the same inputs give bitwise the same outputs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../op_checks.h"
#include "row_kernels.h"

namespace mutex_attn {
namespace {

using at::Tensor;
using namespace cpu_rows;  // the row kernels (row_kernels.h)

// Rows of one feature map: a contiguous NCHW copy (or the tensor itself) and its geometry.
struct Rows {
  Tensor t;
  int64_t rows, length;
};

Rows as_rows(const Tensor& t, const char* name) {
  check_4d(t, name);
  return {t.contiguous(), t.size(0) * t.size(1), t.size(2) * t.size(3)};
}

// Runs f(row_begin, row_end) over all rows in parallel, with chunks of about 32k elements.
template <typename F>
void for_rows(int64_t rows, int64_t length, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, length));
  at::parallel_for(0, rows, grain, f);
}

// The fused MutexAttention ops (K1..K4) read channels_last in place: x decides the layout and
// y, dout follow it (the Python layer passes them so already; a direct call may not).
// Same test as the fake kernels: dense channels_last and not also NCHW-contiguous.
bool is_channels_last(const Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

struct Units {  // the work units of a fused-op kernel: rows (NCHW) or channel blocks (NHWC)
  bool nhwc;
  int lanes;  // channels per block (NHWC)
  int64_t channels, count, length;
};

// K2..K4 on channels_last: the widest block (up to kMaxSweepLanes channels) that still gives
// each thread two units of work.
int sweep_lanes(int64_t N, int64_t C) {
  int lanes = kMaxSweepLanes;
  while (lanes > kStatsLanes && N * channel_blocks(C, lanes) < 2 * at::get_num_threads()) lanes /= 2;
  return lanes;
}

// `stats`: K1's units (blocks of kStatsLanes), else K2..K4's (sweep_lanes).
Units fused_units(const Tensor& x, bool stats = false) {
  check_4d(x, "x");
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  if (!is_channels_last(x)) return {false, 1, C, N * C, L};
  const int lanes = stats ? kStatsLanes : sweep_lanes(N, C);
  return {true, lanes, C, N * channel_blocks(C, lanes), L * lanes};
}

Tensor in_layout(const Tensor& t, const Units& u, const char* name) {
  check_4d(t, name);
  return t.contiguous(u.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// ---------------------------------------------------------------- ops
std::tuple<Tensor, Tensor, Tensor> mab_forward(const Tensor& x_in, const Tensor& y_in) {
  check_same(x_in, y_in, "x", "y");
  auto x = as_rows(x_in, "x"), y = as_rows(y_in, "y");
  check_positions(x.rows, x.length, "mab_forward");
  auto acc = acc_type(x.t);
  Tensor am = at::empty_like(x.t), mu = per_row(x.t, acc), z = per_row(x.t, acc);
  MA_DISPATCH(x.t, "mab_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_rows(x.rows, x.length, [&](int64_t r0, int64_t r1) {
      mab_forward_rows<scalar_t, acc_t>(in<scalar_t>(x.t), in<scalar_t>(y.t), out<scalar_t>(am),
                                        out<acc_t>(mu), out<acc_t>(z), x.length, r0, r1);
    });
  });
  return {am, mu, z};
}

std::tuple<Tensor, Tensor> mab_backward(const Tensor& dam_in, const Tensor& x_in,
                                        const Tensor& y_in, const Tensor& mu_in,
                                        const Tensor& z_in) {
  check_same(x_in, y_in, "x", "y");
  check_same(dam_in, x_in, "dam", "x");
  auto x = as_rows(x_in, "x"), y = as_rows(y_in, "y"), dam = as_rows(dam_in, "dam");
  check_positions(x.rows, x.length, "mab_backward");
  auto acc = acc_type(x.t);
  Tensor mu = row_tensor(mu_in, x.t, acc, "row_max"), z = row_tensor(z_in, x.t, acc, "row_sum");
  Tensor dx = at::empty_like(x.t), dy = at::empty_like(x.t);
  MA_DISPATCH(x.t, "mab_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_rows(x.rows, x.length, [&](int64_t r0, int64_t r1) {
      mab_backward_rows<scalar_t, acc_t>(in<scalar_t>(dam.t), in<scalar_t>(x.t), in<scalar_t>(y.t),
                                         in<acc_t>(mu), in<acc_t>(z), out<scalar_t>(dx),
                                         out<scalar_t>(dy), x.length, r0, r1);
    });
  });
  return {dx, dy};
}

std::tuple<Tensor, Tensor> fab_pool(const Tensor& am_in, const Tensor& y_in) {
  check_same(am_in, y_in, "am", "y");
  auto am = as_rows(am_in, "am"), y = as_rows(y_in, "y");
  check_positions(am.rows, am.length, "fab_pool");
  Tensor v = per_row(am.t, acc_type(am.t)), k = per_row(am.t, at::kLong);
  MA_DISPATCH(am.t, "fab_pool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_rows(am.rows, am.length, [&](int64_t r0, int64_t r1) {
      fab_pool_rows<scalar_t, acc_t>(in<scalar_t>(am.t), in<scalar_t>(y.t), out<acc_t>(v),
                                     out<int64_t>(k), am.length, r0, r1);
    });
  });
  return {v, k};
}

Tensor fab_pool_backward(const Tensor& dv_in, const Tensor& k_in, const Tensor& like) {
  auto acc = acc_type(like);
  Tensor dv = row_tensor(dv_in, like, acc, "dv"), k = row_tensor(k_in, like, at::kLong, "argmax");
  const int64_t rows = like.size(0) * like.size(1), L = like.size(2) * like.size(3);
  Tensor dmix = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  MA_DISPATCH(like, "fab_pool_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_rows(rows, L, [&](int64_t r0, int64_t r1) {
      fab_pool_backward_rows<scalar_t, acc_t>(in<acc_t>(dv), in<int64_t>(k), out<scalar_t>(dmix),
                                              L, r0, r1);
    });
  });
  return dmix;
}

Tensor fab_blend(const Tensor& am_in, const Tensor& y_in, const Tensor& gate_in) {
  check_same(am_in, y_in, "am", "y");
  auto am = as_rows(am_in, "am"), y = as_rows(y_in, "y");
  Tensor gate = row_tensor(gate_in, am.t, acc_type(am.t), "gate");
  Tensor result = at::empty_like(am.t);
  MA_DISPATCH(am.t, "fab_blend", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_rows(am.rows, am.length, [&](int64_t r0, int64_t r1) {
      fab_blend_rows<scalar_t, acc_t>(in<scalar_t>(am.t), in<scalar_t>(y.t), in<acc_t>(gate),
                                      out<scalar_t>(result), am.length, r0, r1);
    });
  });
  return result;
}

std::tuple<Tensor, Tensor, Tensor> fab_blend_backward(const Tensor& dout_in, const Tensor& am_in,
                                                      const Tensor& y_in, const Tensor& gate_in) {
  check_same(am_in, y_in, "am", "y");
  check_same(dout_in, am_in, "dout", "am");
  auto am = as_rows(am_in, "am"), y = as_rows(y_in, "y"), dout = as_rows(dout_in, "dout");
  auto acc = acc_type(am.t);
  Tensor gate = row_tensor(gate_in, am.t, acc, "gate");
  Tensor dam = at::empty_like(am.t), dy = at::empty_like(am.t), dgate = per_row(am.t, acc);
  MA_DISPATCH(am.t, "fab_blend_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_rows(am.rows, am.length, [&](int64_t r0, int64_t r1) {
      fab_blend_backward_rows<scalar_t, acc_t>(
          in<scalar_t>(dout.t), in<scalar_t>(am.t), in<scalar_t>(y.t), in<acc_t>(gate),
          out<scalar_t>(dam), out<scalar_t>(dy), out<acc_t>(dgate), am.length, r0, r1);
    });
  });
  return {dam, dy, dgate};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mutex_attention_stats(const Tensor& x_in, const Tensor& y_in) {
  check_same(x_in, y_in, "x", "y");
  const Units u = fused_units(x_in, /*stats=*/true);
  Tensor x = in_layout(x_in, u, "x"), y = in_layout(y_in, u, "y");
  const int64_t L = x.size(2) * x.size(3);
  check_positions(x.size(0) * x.size(1), L, "mutex_attention_stats");
  auto acc = acc_type(x);
  Tensor v = per_row(x, acc), mu = per_row(x, acc), z = per_row(x, acc), k = per_row(x, at::kLong);
  MA_DISPATCH(x, "mutex_attention_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_rows(u.count, u.length, [&](int64_t r0, int64_t r1) {
      if (u.nhwc)
        stats_nhwc<scalar_t, acc_t>(in<scalar_t>(x), in<scalar_t>(y), out<acc_t>(v), out<acc_t>(mu),
                                    out<acc_t>(z), out<int64_t>(k), u.channels, L, r0, r1);
      else
        stats_rows<scalar_t, acc_t>(in<scalar_t>(x), in<scalar_t>(y), out<acc_t>(v), out<acc_t>(mu),
                                    out<acc_t>(z), out<int64_t>(k), L, r0, r1);
    });
  });
  return {v, mu, z, k};
}

Tensor mutex_attention_apply(const Tensor& x_in, const Tensor& y_in, const Tensor& gate_in,
                             const Tensor& mu_in, const Tensor& z_in) {
  check_same(x_in, y_in, "x", "y");
  const Units u = fused_units(x_in);
  Tensor x = in_layout(x_in, u, "x"), y = in_layout(y_in, u, "y");
  const int64_t L = x.size(2) * x.size(3);
  auto acc = acc_type(x);
  Tensor gate = row_tensor(gate_in, x, acc, "gate"), mu = row_tensor(mu_in, x, acc, "row_max"),
         z = row_tensor(z_in, x, acc, "row_sum");
  Tensor result = at::empty_like(x);  // x's layout
  MA_DISPATCH(x, "mutex_attention_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_rows(u.count, u.length, [&](int64_t r0, int64_t r1) {
      if (u.nhwc)
        apply_nhwc<scalar_t, acc_t>(in<scalar_t>(x), in<scalar_t>(y), in<acc_t>(gate), in<acc_t>(mu),
                                    in<acc_t>(z), out<scalar_t>(result), u.channels, L, u.lanes, r0,
                                    r1);
      else
        apply_rows<scalar_t, acc_t>(in<scalar_t>(x), in<scalar_t>(y), in<acc_t>(gate), in<acc_t>(mu),
                                    in<acc_t>(z), out<scalar_t>(result), L, r0, r1);
    });
  });
  return result;
}

Tensor mutex_attention_backward_stats(const Tensor& dout_in, const Tensor& x_in, const Tensor& y_in,
                                      const Tensor& mu_in, const Tensor& z_in, const Tensor& k_in) {
  check_same(x_in, y_in, "x", "y");
  check_same(dout_in, x_in, "dout", "x");
  const Units u = fused_units(x_in);
  Tensor x = in_layout(x_in, u, "x"), y = in_layout(y_in, u, "y"), dout = in_layout(dout_in, u, "dout");
  const int64_t L = x.size(2) * x.size(3);
  check_positions(x.size(0) * x.size(1), L, "mutex_attention backward");
  auto acc = acc_type(x);
  Tensor mu = row_tensor(mu_in, x, acc, "row_max"), z = row_tensor(z_in, x, acc, "row_sum"),
         k = row_tensor(k_in, x, at::kLong, "argmax");
  Tensor stats = per_row(x, acc, kNumBackwardStats);
  MA_DISPATCH(x, "mutex_attention_backward_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_rows(u.count, u.length, [&](int64_t r0, int64_t r1) {
      if (u.nhwc)
        backward_stats_nhwc<scalar_t, acc_t>(in<scalar_t>(dout), in<scalar_t>(x), in<scalar_t>(y),
                                             in<acc_t>(mu), in<acc_t>(z), in<int64_t>(k),
                                             out<acc_t>(stats), u.channels, L, u.lanes, r0, r1);
      else
        backward_stats_rows<scalar_t, acc_t>(in<scalar_t>(dout), in<scalar_t>(x), in<scalar_t>(y),
                                             in<acc_t>(mu), in<acc_t>(z), in<int64_t>(k),
                                             out<acc_t>(stats), L, r0, r1);
    });
  });
  return stats;
}

std::tuple<Tensor, Tensor> mutex_attention_backward_apply(
    const Tensor& dout_in, const Tensor& x_in, const Tensor& y_in, const Tensor& gate_in,
    const Tensor& dv_in, const Tensor& mu_in, const Tensor& z_in, const Tensor& k_in,
    const Tensor& stats_in) {
  check_same(x_in, y_in, "x", "y");
  check_same(dout_in, x_in, "dout", "x");
  const Units u = fused_units(x_in);
  Tensor x = in_layout(x_in, u, "x"), y = in_layout(y_in, u, "y"), dout = in_layout(dout_in, u, "dout");
  const int64_t L = x.size(2) * x.size(3);
  check_positions(x.size(0) * x.size(1), L, "mutex_attention backward");
  auto acc = acc_type(x);
  Tensor gate = row_tensor(gate_in, x, acc, "gate"), dv = row_tensor(dv_in, x, acc, "dv"),
         mu = row_tensor(mu_in, x, acc, "row_max"), z = row_tensor(z_in, x, acc, "row_sum"),
         k = row_tensor(k_in, x, at::kLong, "argmax"),
         stats = row_tensor(stats_in, x, acc, "backward_stats", kNumBackwardStats);
  Tensor dx = at::empty_like(x), dy = at::empty_like(x);  // x's layout
  MA_DISPATCH(x, "mutex_attention_backward_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_rows(u.count, u.length, [&](int64_t r0, int64_t r1) {
      if (u.nhwc)
        backward_apply_nhwc<scalar_t, acc_t>(
            in<scalar_t>(dout), in<scalar_t>(x), in<scalar_t>(y), in<acc_t>(gate), in<acc_t>(dv),
            in<acc_t>(mu), in<acc_t>(z), in<int64_t>(k), in<acc_t>(stats), out<scalar_t>(dx),
            out<scalar_t>(dy), u.channels, L, u.lanes, r0, r1);
      else
        backward_apply_rows<scalar_t, acc_t>(
            in<scalar_t>(dout), in<scalar_t>(x), in<scalar_t>(y), in<acc_t>(gate), in<acc_t>(dv),
            in<acc_t>(mu), in<acc_t>(z), in<int64_t>(k), in<acc_t>(stats), out<scalar_t>(dx),
            out<scalar_t>(dy), L, r0, r1);
    });
  });
  return {dx, dy};
}

}  // namespace

TORCH_LIBRARY_IMPL(mutex_attn, CPU, m) { MUTEX_ATTN_IMPL_ALL_OPS(m); }

}  // namespace mutex_attn

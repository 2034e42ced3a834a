// CPU kernels of the mutex_attn ops: one row (sample, channel) at a time over its L = H·W
// positions, rows in parallel (at::parallel_for), inner loops written for the compiler to
// vectorize (`omp simd`), accumulation in float (double for double inputs).
//
// Inputs of any layout are made NCHW-contiguous first (on CPU a copy is cheap next to the
// work); outputs are NCHW-contiguous. Each row is reduced in one fixed order, so results do
// not depend on the thread count: the same inputs give bitwise the same outputs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../row_math.h"

namespace mutex_attn {
namespace {

using at::Tensor;

// Rows of one feature map: a contiguous NCHW copy (or the tensor itself) and its geometry.
struct Rows {
  Tensor t;
  int64_t rows, length;
};

Rows as_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "mutex_attn: ", name, " must be 4-D [N, C, H, W], got ", t.sizes());
  return {t.contiguous(), t.size(0) * t.size(1), t.size(2) * t.size(3)};
}

void check_same(const Tensor& a, const Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.sizes() == b.sizes(), "mutex_attn: ", na, " and ", nb,
              " must have the same shape, got ", a.sizes(), " and ", nb, " ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "mutex_attn: ", na, " and ", nb,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// A per-row tensor ([N, C] or [N, C, k]) in the compute dtype, contiguous.
Tensor row_tensor(const Tensor& t, const Tensor& like, at::ScalarType acc, const char* name,
                  int64_t last = 0) {
  std::vector<int64_t> expected{like.size(0), like.size(1)};
  if (last) expected.push_back(last);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), "mutex_attn: ", name, " must have shape ",
              at::IntArrayRef(expected), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, "mutex_attn: ", name, " must be ", acc, ", got ",
              t.scalar_type());
  return t.contiguous();
}

at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor per_row(const Tensor& like, at::ScalarType dtype, int64_t last = 0) {
  std::vector<int64_t> shape{like.size(0), like.size(1)};
  if (last) shape.push_back(last);
  return at::empty(shape, like.options().dtype(dtype));
}

// Runs f(row_begin, row_end) over all rows in parallel, with chunks of about 32k elements.
template <typename F>
void for_rows(int64_t rows, int64_t length, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, length));
  at::parallel_for(0, rows, grain, f);
}

// mu = max d and Z = Σ e^(d − mu) over one row.
template <typename scalar_t, typename acc_t>
void softmax_stats(const scalar_t* x, const scalar_t* y, int64_t L, acc_t& mu, acc_t& z) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  _Pragma("omp simd reduction(max : m)")
  for (int64_t l = 0; l < L; ++l) {
    acc_t d = sq_dist(acc_t(x[l]), acc_t(y[l]));
    m = d > m ? d : m;
  }
  acc_t s = 0;
  _Pragma("omp simd reduction(+ : s)")
  for (int64_t l = 0; l < L; ++l) s += exp_softmax(sq_dist(acc_t(x[l]), acc_t(y[l])) - m);
  mu = m;
  z = s;
}

// v = mean + max of a row already written to `mix`, and the first index of the max.
template <typename acc_t>
void pool_row(const acc_t* mix, int64_t L, acc_t& v, int64_t& k) {
  acc_t sum = 0, best = -std::numeric_limits<acc_t>::infinity();
  _Pragma("omp simd reduction(+ : sum) reduction(max : best)")
  for (int64_t l = 0; l < L; ++l) {
    sum += mix[l];
    best = mix[l] > best ? mix[l] : best;
  }
  k = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (mix[l] == best) {
      k = l;
      break;
    }
  }
  v = sum / acc_t(L) + best;  // NaN in the row reaches v through the sum
}

// ---------------------------------------------------------------- MAB
std::tuple<Tensor, Tensor, Tensor> mab_forward(const Tensor& x_in, const Tensor& y_in) {
  check_same(x_in, y_in, "x", "y");
  auto x = as_rows(x_in, "x"), y = as_rows(y_in, "y");
  auto acc = acc_type(x.t);
  Tensor am = at::empty_like(x.t), mu_t = per_row(x.t, acc), z_t = per_row(x.t, acc);
  const int64_t L = x.length;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.t.scalar_type(), "mab_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.t.const_data_ptr<scalar_t>(), *yp = y.t.const_data_ptr<scalar_t>();
    scalar_t* ap = am.mutable_data_ptr<scalar_t>();
    acc_t *mup = mu_t.mutable_data_ptr<acc_t>(), *zp = z_t.mutable_data_ptr<acc_t>();
    for_rows(x.rows, L, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t *xr = xp + r * L, *yr = yp + r * L;
        acc_t mu, z;
        softmax_stats(xr, yr, L, mu, z);
        const acc_t inv_z = acc_t(1) / z;
        scalar_t* out = ap + r * L;
        _Pragma("omp simd")
        for (int64_t l = 0; l < L; ++l) {
          acc_t yv = yr[l];
          out[l] = static_cast<scalar_t>(attention<acc_t>(xr[l], yv, mu, inv_z) * yv);
        }
        mup[r] = mu;
        zp[r] = z;
      }
    });
  });
  return {am, mu_t, z_t};
}

std::tuple<Tensor, Tensor> mab_backward(const Tensor& dam_in, const Tensor& x_in,
                                        const Tensor& y_in, const Tensor& mu_in,
                                        const Tensor& z_in) {
  check_same(x_in, y_in, "x", "y");
  check_same(dam_in, x_in, "dam", "x");
  auto x = as_rows(x_in, "x"), y = as_rows(y_in, "y"), dam = as_rows(dam_in, "dam");
  auto acc = acc_type(x.t);
  Tensor mu_t = row_tensor(mu_in, x.t, acc, "row_max"), z_t = row_tensor(z_in, x.t, acc, "row_sum");
  Tensor dx = at::empty_like(x.t), dy = at::empty_like(x.t);
  const int64_t L = x.length;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.t.scalar_type(), "mab_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.t.const_data_ptr<scalar_t>(), *yp = y.t.const_data_ptr<scalar_t>(),
                   *gp = dam.t.const_data_ptr<scalar_t>();
    scalar_t *dxp = dx.mutable_data_ptr<scalar_t>(), *dyp = dy.mutable_data_ptr<scalar_t>();
    const acc_t *mup = mu_t.const_data_ptr<acc_t>(), *zp = z_t.const_data_ptr<acc_t>();
    for_rows(x.rows, L, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * L;
        const acc_t mu = mup[r], inv_z = acc_t(1) / zp[r];
        acc_t s = 0;
        _Pragma("omp simd reduction(+ : s)")
        for (int64_t l = 0; l < L; ++l) {
          acc_t yv = yp[o + l];
          s += attention<acc_t>(xp[o + l], yv, mu, inv_z) * acc_t(gp[o + l]) * yv;
        }
        _Pragma("omp simd")
        for (int64_t l = 0; l < L; ++l) {
          acc_t xv = xp[o + l], yv = yp[o + l], ddx, ddy;
          mab_backward_element<acc_t>(xv, yv, gp[o + l], attention<acc_t>(xv, yv, mu, inv_z), s, ddx, ddy);
          dxp[o + l] = static_cast<scalar_t>(ddx);
          dyp[o + l] = static_cast<scalar_t>(ddy);
        }
      }
    });
  });
  return {dx, dy};
}

// ---------------------------------------------------------------- FAB pieces
std::tuple<Tensor, Tensor> fab_pool(const Tensor& am_in, const Tensor& y_in) {
  check_same(am_in, y_in, "am", "y");
  auto am = as_rows(am_in, "am"), y = as_rows(y_in, "y");
  TORCH_CHECK(am.length > 0 || am.rows == 0, "mutex_attn: fab_pool needs H·W >= 1");
  Tensor v = per_row(am.t, acc_type(am.t)), k_t = per_row(am.t, at::kLong);
  const int64_t L = am.length;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, am.t.scalar_type(), "fab_pool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *ap = am.t.const_data_ptr<scalar_t>(), *yp = y.t.const_data_ptr<scalar_t>();
    acc_t* vp = v.mutable_data_ptr<acc_t>();
    int64_t* kp = k_t.mutable_data_ptr<int64_t>();
    for_rows(am.rows, L, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> mix(L);
      for (int64_t r = r0; r < r1; ++r) {
        _Pragma("omp simd")
        for (int64_t l = 0; l < L; ++l) mix[l] = acc_t(ap[r * L + l]) + acc_t(yp[r * L + l]);
        pool_row(mix.data(), L, vp[r], kp[r]);
      }
    });
  });
  return {v, k_t};
}

Tensor fab_pool_backward(const Tensor& dv_in, const Tensor& k_in, const Tensor& like) {
  auto acc = acc_type(like);
  Tensor dv = row_tensor(dv_in, like, acc, "dv"), k_t = row_tensor(k_in, like, at::kLong, "argmax");
  const int64_t rows = like.size(0) * like.size(1), L = like.size(2) * like.size(3);
  Tensor dmix = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "fab_pool_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* dvp = dv.const_data_ptr<acc_t>();
    const int64_t* kp = k_t.const_data_ptr<int64_t>();
    scalar_t* out = dmix.mutable_data_ptr<scalar_t>();
    for_rows(rows, L, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t mean_grad = dvp[r] / acc_t(L);
        const scalar_t fill = static_cast<scalar_t>(mean_grad);
        _Pragma("omp simd")
        for (int64_t l = 0; l < L; ++l) out[r * L + l] = fill;
        out[r * L + kp[r]] = static_cast<scalar_t>(mean_grad + dvp[r]);
      }
    });
  });
  return dmix;
}

Tensor fab_blend(const Tensor& am_in, const Tensor& y_in, const Tensor& gate_in) {
  check_same(am_in, y_in, "am", "y");
  auto am = as_rows(am_in, "am"), y = as_rows(y_in, "y");
  Tensor gate = row_tensor(gate_in, am.t, acc_type(am.t), "gate");
  Tensor out = at::empty_like(am.t);
  const int64_t L = am.length;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, am.t.scalar_type(), "fab_blend", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *ap = am.t.const_data_ptr<scalar_t>(), *yp = y.t.const_data_ptr<scalar_t>();
    const acc_t* gp = gate.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_rows(am.rows, L, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t g = gp[r];
        _Pragma("omp simd")
        for (int64_t l = 0; l < L; ++l) {
          acc_t yv = yp[r * L + l];
          op[r * L + l] = static_cast<scalar_t>(yv + g * (acc_t(ap[r * L + l]) - yv));
        }
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> fab_blend_backward(const Tensor& dout_in, const Tensor& am_in,
                                                      const Tensor& y_in, const Tensor& gate_in) {
  check_same(am_in, y_in, "am", "y");
  check_same(dout_in, am_in, "dout", "am");
  auto am = as_rows(am_in, "am"), y = as_rows(y_in, "y"), dout = as_rows(dout_in, "dout");
  auto acc = acc_type(am.t);
  Tensor gate = row_tensor(gate_in, am.t, acc, "gate");
  Tensor dam = at::empty_like(am.t), dy = at::empty_like(am.t), dgate = per_row(am.t, acc);
  const int64_t L = am.length;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, am.t.scalar_type(), "fab_blend_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *ap = am.t.const_data_ptr<scalar_t>(), *yp = y.t.const_data_ptr<scalar_t>(),
                   *gp = dout.t.const_data_ptr<scalar_t>();
    const acc_t* gate_p = gate.const_data_ptr<acc_t>();
    scalar_t *damp = dam.mutable_data_ptr<scalar_t>(), *dyp = dy.mutable_data_ptr<scalar_t>();
    acc_t* dgp = dgate.mutable_data_ptr<acc_t>();
    for_rows(am.rows, L, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t g = gate_p[r];
        acc_t sum = 0;
        _Pragma("omp simd reduction(+ : sum)")
        for (int64_t l = 0; l < L; ++l) {
          const int64_t i = r * L + l;
          acc_t go = gp[i];
          sum += go * (acc_t(ap[i]) - acc_t(yp[i]));
          damp[i] = static_cast<scalar_t>(g * go);
          dyp[i] = static_cast<scalar_t>((acc_t(1) - g) * go);
        }
        dgp[r] = sum;
      }
    });
  });
  return {dam, dy, dgate};
}

// ---------------------------------------------------------------- fused MutexAttention
// K1: per row mu, Z (sweeps 1–2), then mix = y (1 + A) for v = mean + max and k (sweep 3).
std::tuple<Tensor, Tensor, Tensor, Tensor> mutex_attention_stats(const Tensor& x_in, const Tensor& y_in) {
  check_same(x_in, y_in, "x", "y");
  auto x = as_rows(x_in, "x"), y = as_rows(y_in, "y");
  TORCH_CHECK(x.length > 0 || x.rows == 0, "mutex_attn: mutex_attention needs H·W >= 1");
  auto acc = acc_type(x.t);
  Tensor v = per_row(x.t, acc), mu_t = per_row(x.t, acc), z_t = per_row(x.t, acc),
         k_t = per_row(x.t, at::kLong);
  const int64_t L = x.length;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.t.scalar_type(), "mutex_attention_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.t.const_data_ptr<scalar_t>(), *yp = y.t.const_data_ptr<scalar_t>();
    acc_t *vp = v.mutable_data_ptr<acc_t>(), *mup = mu_t.mutable_data_ptr<acc_t>(),
          *zp = z_t.mutable_data_ptr<acc_t>();
    int64_t* kp = k_t.mutable_data_ptr<int64_t>();
    for_rows(x.rows, L, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> mix(L);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t *xr = xp + r * L, *yr = yp + r * L;
        acc_t mu, z;
        softmax_stats(xr, yr, L, mu, z);
        const acc_t inv_z = acc_t(1) / z;
        _Pragma("omp simd")
        for (int64_t l = 0; l < L; ++l) {
          acc_t yv = yr[l];
          mix[l] = attention<acc_t>(xr[l], yv, mu, inv_z) * yv + yv;
        }
        pool_row(mix.data(), L, vp[r], kp[r]);
        mup[r] = mu;
        zp[r] = z;
      }
    });
  });
  return {v, mu_t, z_t, k_t};
}

// K2: out = y + g (A·y − y).
Tensor mutex_attention_apply(const Tensor& x_in, const Tensor& y_in, const Tensor& gate_in,
                             const Tensor& mu_in, const Tensor& z_in) {
  check_same(x_in, y_in, "x", "y");
  auto x = as_rows(x_in, "x"), y = as_rows(y_in, "y");
  auto acc = acc_type(x.t);
  Tensor gate = row_tensor(gate_in, x.t, acc, "gate"), mu_t = row_tensor(mu_in, x.t, acc, "row_max"),
         z_t = row_tensor(z_in, x.t, acc, "row_sum");
  Tensor out = at::empty_like(x.t);
  const int64_t L = x.length;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.t.scalar_type(), "mutex_attention_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.t.const_data_ptr<scalar_t>(), *yp = y.t.const_data_ptr<scalar_t>();
    const acc_t *gp = gate.const_data_ptr<acc_t>(), *mup = mu_t.const_data_ptr<acc_t>(),
                *zp = z_t.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_rows(x.rows, L, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * L;
        const acc_t g = gp[r], mu = mup[r], inv_z = acc_t(1) / zp[r];
        _Pragma("omp simd")
        for (int64_t l = 0; l < L; ++l) {
          acc_t yv = yp[o + l];
          acc_t am = attention<acc_t>(xp[o + l], yv, mu, inv_z) * yv;
          op[o + l] = static_cast<scalar_t>(yv + g * (am - yv));
        }
      }
    });
  });
  return out;
}

// K3: the row scalars of BackwardStat (S1, Σ dout·y, S2, A_k·y_k).
Tensor mutex_attention_backward_stats(const Tensor& dout_in, const Tensor& x_in, const Tensor& y_in,
                                      const Tensor& mu_in, const Tensor& z_in, const Tensor& k_in) {
  check_same(x_in, y_in, "x", "y");
  check_same(dout_in, x_in, "dout", "x");
  auto x = as_rows(x_in, "x"), y = as_rows(y_in, "y"), dout = as_rows(dout_in, "dout");
  auto acc = acc_type(x.t);
  Tensor mu_t = row_tensor(mu_in, x.t, acc, "row_max"), z_t = row_tensor(z_in, x.t, acc, "row_sum"),
         k_t = row_tensor(k_in, x.t, at::kLong, "argmax");
  Tensor stats = per_row(x.t, acc, kNumBackwardStats);
  const int64_t L = x.length;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.t.scalar_type(), "mutex_attention_backward_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.t.const_data_ptr<scalar_t>(), *yp = y.t.const_data_ptr<scalar_t>(),
                   *gp = dout.t.const_data_ptr<scalar_t>();
    const acc_t *mup = mu_t.const_data_ptr<acc_t>(), *zp = z_t.const_data_ptr<acc_t>();
    const int64_t* kp = k_t.const_data_ptr<int64_t>();
    acc_t* sp = stats.mutable_data_ptr<acc_t>();
    for_rows(x.rows, L, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * L;
        const acc_t mu = mup[r], inv_z = acc_t(1) / zp[r];
        acc_t s1 = 0, dout_y = 0, s2 = 0;
        _Pragma("omp simd reduction(+ : s1, dout_y, s2)")
        for (int64_t l = 0; l < L; ++l) {
          acc_t yv = yp[o + l], go = gp[o + l];
          acc_t am = attention<acc_t>(xp[o + l], yv, mu, inv_z) * yv;
          s1 += am * go;
          dout_y += go * yv;
          s2 += am;
        }
        const int64_t k = o + kp[r];
        acc_t* row = sp + r * kNumBackwardStats;
        row[kS1] = s1;
        row[kDoutY] = dout_y;
        row[kS2] = s2;
        row[kAmAtMax] = attention<acc_t>(xp[k], yp[k], mu, inv_z) * acc_t(yp[k]);
      }
    });
  });
  return stats;
}

// K4: dx, dy in one sweep, from the K3 scalars and dv (the gate network's backward).
std::tuple<Tensor, Tensor> mutex_attention_backward_apply(
    const Tensor& dout_in, const Tensor& x_in, const Tensor& y_in, const Tensor& gate_in,
    const Tensor& dv_in, const Tensor& mu_in, const Tensor& z_in, const Tensor& k_in,
    const Tensor& stats_in) {
  check_same(x_in, y_in, "x", "y");
  check_same(dout_in, x_in, "dout", "x");
  auto x = as_rows(x_in, "x"), y = as_rows(y_in, "y"), dout = as_rows(dout_in, "dout");
  auto acc = acc_type(x.t);
  Tensor gate = row_tensor(gate_in, x.t, acc, "gate"), dv = row_tensor(dv_in, x.t, acc, "dv"),
         mu_t = row_tensor(mu_in, x.t, acc, "row_max"), z_t = row_tensor(z_in, x.t, acc, "row_sum"),
         k_t = row_tensor(k_in, x.t, at::kLong, "argmax"),
         stats = row_tensor(stats_in, x.t, acc, "backward_stats", kNumBackwardStats);
  Tensor dx = at::empty_like(x.t), dy = at::empty_like(x.t);
  const int64_t L = x.length;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.t.scalar_type(), "mutex_attention_backward_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.t.const_data_ptr<scalar_t>(), *yp = y.t.const_data_ptr<scalar_t>(),
                   *gp = dout.t.const_data_ptr<scalar_t>();
    const acc_t *gate_p = gate.const_data_ptr<acc_t>(), *dvp = dv.const_data_ptr<acc_t>(),
                *mup = mu_t.const_data_ptr<acc_t>(), *zp = z_t.const_data_ptr<acc_t>(),
                *sp = stats.const_data_ptr<acc_t>();
    const int64_t* kp = k_t.const_data_ptr<int64_t>();
    scalar_t *dxp = dx.mutable_data_ptr<scalar_t>(), *dyp = dy.mutable_data_ptr<scalar_t>();
    for_rows(x.rows, L, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * L;
        const acc_t* st = sp + r * kNumBackwardStats;
        const acc_t g = gate_p[r], dvr = dvp[r], mean_grad = dvr / acc_t(L);
        const acc_t mu = mup[r], inv_z = acc_t(1) / zp[r];
        const acc_t s = g * st[kS1] + mean_grad * st[kS2] + dvr * st[kAmAtMax];
        auto element = [&](int64_t i, acc_t pool_grad) {
          acc_t xv = xp[i], yv = yp[i], ddx, ddy;
          mutex_backward_element<acc_t>(xv, yv, gp[i], attention<acc_t>(xv, yv, mu, inv_z), g,
                                        pool_grad, s, ddx, ddy);
          dxp[i] = static_cast<scalar_t>(ddx);
          dyp[i] = static_cast<scalar_t>(ddy);
        };
        _Pragma("omp simd")
        for (int64_t l = 0; l < L; ++l) element(o + l, mean_grad);
        element(o + kp[r], mean_grad + dvr);  // the max also routes dv to the first argmax
      }
    });
  });
  return {dx, dy};
}

}  // namespace

TORCH_LIBRARY_IMPL(mutex_attn, CPU, m) {
  m.impl("mab_forward", &mab_forward);
  m.impl("mab_backward", &mab_backward);
  m.impl("fab_pool", &fab_pool);
  m.impl("fab_pool_backward", &fab_pool_backward);
  m.impl("fab_blend", &fab_blend);
  m.impl("fab_blend_backward", &fab_blend_backward);
  m.impl("mutex_attention_stats", &mutex_attention_stats);
  m.impl("mutex_attention_apply", &mutex_attention_apply);
  m.impl("mutex_attention_backward_stats", &mutex_attention_backward_stats);
  m.impl("mutex_attention_backward_apply", &mutex_attention_backward_apply);
}

}  // namespace mutex_attn

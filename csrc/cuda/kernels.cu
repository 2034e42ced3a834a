// CUDA kernels of the mutex_attn ops.
//
// Row kernels (reductions over the L = H·W positions of a (sample, channel) row) use one
// block for RPB rows × LANES lanes; a lane strides over its row, so any L works (16 384 and
// 65 536 loop inside the block; no size limit). Reductions go through shared memory in a
// fixed tree order: no atomics, bitwise the same results run after run.
// Element kernels (K2, K4, the blend, the pool backward) are grid-stride loops.
//
// Layouts without copies: NCHW (row = contiguous run of L) and channels_last (a row is
// strided by C; consecutive threads then take consecutive channels so loads coalesce). Any
// other layout is made NCHW-contiguous first. Outputs keep the layout used (channels_last in,
// channels_last out), which is what the fake kernels in backends/native.py declare.
// Accumulation in float32 (float64 for float64 inputs), on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../op_checks.h"
#include "../row_math.h"

namespace mutex_attn {
namespace {

using at::Tensor;

// ------------------------------------------------------------------ geometry
struct Geometry {
  int64_t rows, L, C;
  bool nhwc;
};

// Where element l of row r lives.
struct RowView {
  int64_t base, stride;
  __device__ __forceinline__ int64_t at(int64_t l) const { return base + l * stride; }
};

__device__ __forceinline__ RowView row_view(const Geometry& g, int64_t row) {
  if (!g.nhwc) return {row * g.L, 1};
  const int64_t n = row / g.C, c = row % g.C;
  return {n * g.L * g.C + c, g.C};
}

// Row and position of the i-th element in memory order.
__device__ __forceinline__ void locate(const Geometry& g, int64_t i, int64_t& row, int64_t& l) {
  if (!g.nhwc) {
    row = i / g.L;
    l = i - row * g.L;
  } else {
    const int64_t c = i % g.C, t = i / g.C;
    l = t % g.L;
    row = (t / g.L) * g.C + c;
  }
}

// The feature-map layout to compute in: x's own when it is NCHW or channels_last contiguous.
struct Prepared {
  Tensor t;
  Geometry g;
};

Prepared prepare(const Tensor& x) {
  const bool nhwc = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  Tensor t = nhwc ? x : x.contiguous();
  return {t, {x.size(0) * x.size(1), x.size(2) * x.size(3), x.size(1), nhwc}};
}

// Another full tensor in the same layout as the prepared one (a copy only on a mismatch).
Tensor same_layout(const Tensor& t, const Prepared& p) {
  return t.contiguous(p.g.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

Tensor new_like(const Prepared& p) {
  return at::empty_like(p.t, p.g.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// ------------------------------------------------------------------ launch shapes
struct RowLaunch {
  int lanes, rows_per_block;
  int threads() const { return lanes * rows_per_block; }
};

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < 1024) p <<= 1;
  return p;
}

// channels_last: 32 channels × 8 lanes, coalesced across channels. NCHW: about 4 positions a
// lane, 32..512 lanes, several short rows per block (L = 49: 8 rows of 32 lanes).
RowLaunch row_launch(const Geometry& g) {
  if (g.nhwc) return {8, 32};
  int lanes = next_pow2((g.L + 3) / 4);
  lanes = lanes < 32 ? 32 : (lanes > 512 ? 512 : lanes);
  return {lanes, lanes >= 256 ? 1 : 256 / lanes};
}

struct ThreadInRow {
  int lane, lanes, rloc, rpb;
  int64_t row;
  bool active;
};

__device__ __forceinline__ ThreadInRow thread_in_row(const Geometry& g, int lanes, int rpb) {
  ThreadInRow t;
  t.lanes = lanes;
  t.rpb = rpb;
  if (g.nhwc) {  // consecutive threads: consecutive rows (channels)
    t.rloc = threadIdx.x % rpb;
    t.lane = threadIdx.x / rpb;
  } else {  // consecutive threads: consecutive positions
    t.lane = threadIdx.x % lanes;
    t.rloc = threadIdx.x / lanes;
  }
  t.row = static_cast<int64_t>(blockIdx.x) * rpb + t.rloc;
  t.active = t.row < g.rows;
  return t;
}

// ------------------------------------------------------------------ block reductions
// Shared memory holds one slot per thread and value: slot(k, lane, rloc).
template <typename acc_t>
__device__ __forceinline__ acc_t& slot(acc_t* smem, const ThreadInRow& t, int k, int lane) {
  return smem[(k * t.lanes + lane) * t.rpb + t.rloc];
}

// Sums K values over the lanes of each row; every lane gets the row's totals.
template <int K, typename acc_t>
__device__ void row_sum(acc_t (&v)[K], acc_t* smem, const ThreadInRow& t) {
  for (int k = 0; k < K; ++k) slot(smem, t, k, t.lane) = v[k];
  __syncthreads();
  for (int s = t.lanes / 2; s > 0; s >>= 1) {
    if (t.lane < s)
      for (int k = 0; k < K; ++k) slot(smem, t, k, t.lane) += slot(smem, t, k, t.lane + s);
    __syncthreads();
  }
  for (int k = 0; k < K; ++k) v[k] = slot(smem, t, k, 0);
  __syncthreads();
}

// Online softmax statistics (max m, Σ e^(d − m)) merged over the lanes of each row.
template <typename acc_t>
__device__ __forceinline__ void softmax_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t mm = m2 > m ? m2 : m;
  // A lane that saw no position has s = 0 and m = −inf: it adds nothing (and no NaN).
  const acc_t a = s == acc_t(0) ? acc_t(0) : s * exp_softmax(m - mm);
  const acc_t b = s2 == acc_t(0) ? acc_t(0) : s2 * exp_softmax(m2 - mm);
  m = mm;
  s = a + b;
}

template <typename acc_t>
__device__ void row_softmax_merge(acc_t& m, acc_t& s, acc_t* smem, const ThreadInRow& t) {
  slot(smem, t, 0, t.lane) = m;
  slot(smem, t, 1, t.lane) = s;
  __syncthreads();
  for (int w = t.lanes / 2; w > 0; w >>= 1) {
    if (t.lane < w) {
      acc_t mm = slot(smem, t, 0, t.lane), ss = slot(smem, t, 1, t.lane);
      softmax_merge(mm, ss, slot(smem, t, 0, t.lane + w), slot(smem, t, 1, t.lane + w));
      slot(smem, t, 0, t.lane) = mm;
      slot(smem, t, 1, t.lane) = ss;
    }
    __syncthreads();
  }
  m = slot(smem, t, 0, 0);
  s = slot(smem, t, 1, 0);
  __syncthreads();
}

// Sum and first argmax of the row; `idx` slots live after the value slots.
template <typename acc_t>
__device__ void row_sum_argmax(acc_t& sum, acc_t& best, int64_t& k, acc_t* smem,
                               int64_t* ismem, const ThreadInRow& t) {
  slot(smem, t, 0, t.lane) = sum;
  slot(smem, t, 1, t.lane) = best;
  slot(ismem, t, 0, t.lane) = k;
  __syncthreads();
  for (int w = t.lanes / 2; w > 0; w >>= 1) {
    if (t.lane < w) {
      slot(smem, t, 0, t.lane) += slot(smem, t, 0, t.lane + w);
      const acc_t b2 = slot(smem, t, 1, t.lane + w);
      const int64_t k2 = slot(ismem, t, 0, t.lane + w);
      const acc_t b1 = slot(smem, t, 1, t.lane);
      if (b2 > b1 || (b2 == b1 && k2 < slot(ismem, t, 0, t.lane))) {
        slot(smem, t, 1, t.lane) = b2;
        slot(ismem, t, 0, t.lane) = k2;
      }
    }
    __syncthreads();
  }
  sum = slot(smem, t, 0, 0);
  best = slot(smem, t, 1, 0);
  k = slot(ismem, t, 0, 0);
  __syncthreads();
}

// mu, Z of one row, in one sweep (online softmax) plus the merge.
template <typename scalar_t, typename acc_t>
__device__ void row_softmax_stats(const scalar_t* x, const scalar_t* y, const RowView& rv,
                                  int64_t L, acc_t* smem, const ThreadInRow& t, acc_t& mu,
                                  acc_t& z) {
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
  if (t.active) {
    for (int64_t l = t.lane; l < L; l += t.lanes) {
      const acc_t d = sq_dist(static_cast<acc_t>(x[rv.at(l)]), static_cast<acc_t>(y[rv.at(l)]));
      if (d > m) {
        s = s * exp_softmax(m - d) + acc_t(1);
        m = d;
      } else {
        s += exp_softmax(d - m);  // NaN d lands here and makes the row NaN
      }
    }
  }
  row_softmax_merge(m, s, smem, t);
  mu = m;
  z = s;
}

template <typename acc_t>
__device__ __forceinline__ acc_t* shared_acc() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<acc_t*>(smem_raw);
}

// ------------------------------------------------------------------ row kernels
template <typename scalar_t, typename acc_t>
__global__ void mab_forward_kernel(const scalar_t* x, const scalar_t* y, scalar_t* am,
                                   acc_t* mu_out, acc_t* z_out, Geometry g, int lanes, int rpb) {
  acc_t* smem = shared_acc<acc_t>();
  const ThreadInRow t = thread_in_row(g, lanes, rpb);
  const RowView rv = row_view(g, t.active ? t.row : 0);
  acc_t mu, z;
  row_softmax_stats(x, y, rv, g.L, smem, t, mu, z);
  if (!t.active) return;
  const acc_t inv_z = acc_t(1) / z;
  for (int64_t l = t.lane; l < g.L; l += lanes) {
    const acc_t yv = static_cast<acc_t>(y[rv.at(l)]);
    am[rv.at(l)] = static_cast<scalar_t>(attention(static_cast<acc_t>(x[rv.at(l)]), yv, mu, inv_z) * yv);
  }
  if (t.lane == 0) {
    mu_out[t.row] = mu;
    z_out[t.row] = z;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void mab_backward_kernel(const scalar_t* dam, const scalar_t* x, const scalar_t* y,
                                    const acc_t* mu_in, const acc_t* z_in, scalar_t* dx,
                                    scalar_t* dy, Geometry g, int lanes, int rpb) {
  acc_t* smem = shared_acc<acc_t>();
  const ThreadInRow t = thread_in_row(g, lanes, rpb);
  const RowView rv = row_view(g, t.active ? t.row : 0);
  const acc_t mu = t.active ? mu_in[t.row] : acc_t(0), inv_z = t.active ? acc_t(1) / z_in[t.row] : acc_t(0);
  acc_t s[1] = {0};
  if (t.active)
    for (int64_t l = t.lane; l < g.L; l += lanes) {
      const acc_t yv = static_cast<acc_t>(y[rv.at(l)]);
      s[0] += attention(static_cast<acc_t>(x[rv.at(l)]), yv, mu, inv_z) *
              static_cast<acc_t>(dam[rv.at(l)]) * yv;
    }
  row_sum(s, smem, t);
  if (!t.active) return;
  for (int64_t l = t.lane; l < g.L; l += lanes) {
    const int64_t i = rv.at(l);
    const acc_t xv = static_cast<acc_t>(x[i]), yv = static_cast<acc_t>(y[i]);
    acc_t ddx, ddy;
    mab_backward_element(xv, yv, static_cast<acc_t>(dam[i]), attention(xv, yv, mu, inv_z), s[0], ddx, ddy);
    dx[i] = static_cast<scalar_t>(ddx);
    dy[i] = static_cast<scalar_t>(ddy);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void fab_pool_kernel(const scalar_t* am, const scalar_t* y, acc_t* v, int64_t* k_out,
                                Geometry g, int lanes, int rpb) {
  acc_t* smem = shared_acc<acc_t>();
  int64_t* ismem = reinterpret_cast<int64_t*>(smem + 2 * lanes * rpb);
  const ThreadInRow t = thread_in_row(g, lanes, rpb);
  const RowView rv = row_view(g, t.active ? t.row : 0);
  acc_t sum = 0, best = -std::numeric_limits<acc_t>::infinity();
  int64_t k = 0;
  if (t.active)
    for (int64_t l = t.lane; l < g.L; l += lanes) {
      const acc_t mix = static_cast<acc_t>(am[rv.at(l)]) + static_cast<acc_t>(y[rv.at(l)]);
      sum += mix;
      if (mix > best) {  // lanes visit positions in increasing order: the first max wins
        best = mix;
        k = l;
      }
    }
  row_sum_argmax(sum, best, k, smem, ismem, t);
  if (t.active && t.lane == 0) {
    v[t.row] = sum / acc_t(g.L) + best;
    k_out[t.row] = k;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void fab_blend_backward_kernel(const scalar_t* dout, const scalar_t* am,
                                          const scalar_t* y, const acc_t* gate, scalar_t* dam,
                                          scalar_t* dy, acc_t* dgate, Geometry g, int lanes, int rpb) {
  acc_t* smem = shared_acc<acc_t>();
  const ThreadInRow t = thread_in_row(g, lanes, rpb);
  const RowView rv = row_view(g, t.active ? t.row : 0);
  const acc_t gr = t.active ? gate[t.row] : acc_t(0);
  acc_t sum[1] = {0};
  if (t.active)
    for (int64_t l = t.lane; l < g.L; l += lanes) {
      const int64_t i = rv.at(l);
      const acc_t go = static_cast<acc_t>(dout[i]);
      sum[0] += go * (static_cast<acc_t>(am[i]) - static_cast<acc_t>(y[i]));
      dam[i] = static_cast<scalar_t>(gr * go);
      dy[i] = static_cast<scalar_t>((acc_t(1) - gr) * go);
    }
  row_sum(sum, smem, t);
  if (t.active && t.lane == 0) dgate[t.row] = sum[0];
}

// K1: mu, Z (online, one sweep), then mix = y + A·y: its sum and first argmax (second sweep,
// served from L2 when the row fits).
template <typename scalar_t, typename acc_t>
__global__ void stats_kernel(const scalar_t* x, const scalar_t* y, acc_t* v, acc_t* mu_out,
                             acc_t* z_out, int64_t* k_out, Geometry g, int lanes, int rpb) {
  acc_t* smem = shared_acc<acc_t>();
  int64_t* ismem = reinterpret_cast<int64_t*>(smem + 2 * lanes * rpb);
  const ThreadInRow t = thread_in_row(g, lanes, rpb);
  const RowView rv = row_view(g, t.active ? t.row : 0);
  acc_t mu, z;
  row_softmax_stats(x, y, rv, g.L, smem, t, mu, z);
  const acc_t inv_z = acc_t(1) / z;
  acc_t sum = 0, best = -std::numeric_limits<acc_t>::infinity();
  int64_t k = 0;
  if (t.active)
    for (int64_t l = t.lane; l < g.L; l += lanes) {
      const acc_t yv = static_cast<acc_t>(y[rv.at(l)]);
      const acc_t mix = attention(static_cast<acc_t>(x[rv.at(l)]), yv, mu, inv_z) * yv + yv;
      sum += mix;
      if (mix > best) {
        best = mix;
        k = l;
      }
    }
  row_sum_argmax(sum, best, k, smem, ismem, t);
  if (t.active && t.lane == 0) {
    v[t.row] = sum / acc_t(g.L) + best;  // NaN in the row reaches v through the sum
    mu_out[t.row] = mu;
    z_out[t.row] = z;
    k_out[t.row] = k;
  }
}

// K3: S1 = Σ A·dout·y, Σ dout·y, S2 = Σ A·y, and A_k·y_k.
template <typename scalar_t, typename acc_t>
__global__ void backward_stats_kernel(const scalar_t* dout, const scalar_t* x, const scalar_t* y,
                                      const acc_t* mu_in, const acc_t* z_in, const int64_t* k_in,
                                      acc_t* stats, Geometry g, int lanes, int rpb) {
  acc_t* smem = shared_acc<acc_t>();
  const ThreadInRow t = thread_in_row(g, lanes, rpb);
  const RowView rv = row_view(g, t.active ? t.row : 0);
  const acc_t mu = t.active ? mu_in[t.row] : acc_t(0), inv_z = t.active ? acc_t(1) / z_in[t.row] : acc_t(0);
  acc_t s[3] = {0, 0, 0};
  if (t.active)
    for (int64_t l = t.lane; l < g.L; l += lanes) {
      const int64_t i = rv.at(l);
      const acc_t yv = static_cast<acc_t>(y[i]), go = static_cast<acc_t>(dout[i]);
      const acc_t am = attention(static_cast<acc_t>(x[i]), yv, mu, inv_z) * yv;
      s[0] += am * go;
      s[1] += go * yv;
      s[2] += am;
    }
  row_sum(s, smem, t);
  if (t.active && t.lane == 0) {
    acc_t* row = stats + t.row * kNumBackwardStats;
    const int64_t k = k_in[t.row];
    row[kS1] = s[0];
    row[kDoutY] = s[1];
    row[kS2] = s[2];
    if (valid_position(k, g.L)) {
      const int64_t i = rv.at(k);
      const acc_t yk = static_cast<acc_t>(y[i]);
      row[kAmAtMax] = attention(static_cast<acc_t>(x[i]), yk, mu, inv_z) * yk;
    } else {
      row[kAmAtMax] = std::numeric_limits<acc_t>::quiet_NaN();  // and so the row's grads
    }
  }
}

// ------------------------------------------------------------------ element kernels
#define MA_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)

template <typename scalar_t, typename acc_t>
__global__ void fab_pool_backward_kernel(const acc_t* dv, const int64_t* k, scalar_t* dmix,
                                         int64_t rows, int64_t L) {
  MA_GRID_STRIDE(i, rows * L) {  // dmix is NCHW-contiguous
    const int64_t row = i / L, l = i - row * L;
    const acc_t d = valid_position(k[row], L) ? dv[row] : std::numeric_limits<acc_t>::quiet_NaN();
    dmix[i] = static_cast<scalar_t>(d / acc_t(L) + (l == k[row] ? d : acc_t(0)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void fab_blend_kernel(const scalar_t* am, const scalar_t* y, const acc_t* gate,
                                 scalar_t* out, Geometry g) {
  MA_GRID_STRIDE(i, g.rows * g.L) {
    int64_t row, l;
    locate(g, i, row, l);
    const acc_t yv = static_cast<acc_t>(y[i]);
    out[i] = static_cast<scalar_t>(yv + gate[row] * (static_cast<acc_t>(am[i]) - yv));
  }
}

// K2: out = y + g (A·y − y).
template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* x, const scalar_t* y, const acc_t* gate,
                             const acc_t* mu, const acc_t* z, scalar_t* out, Geometry g) {
  MA_GRID_STRIDE(i, g.rows * g.L) {
    int64_t row, l;
    locate(g, i, row, l);
    const acc_t yv = static_cast<acc_t>(y[i]);
    const acc_t a = attention(static_cast<acc_t>(x[i]), yv, mu[row], acc_t(1) / z[row]);
    out[i] = static_cast<scalar_t>(yv + gate[row] * (a * yv - yv));
  }
}

// K4: dx, dy from the K3 scalars and dv.
template <typename scalar_t, typename acc_t>
__global__ void backward_apply_kernel(const scalar_t* dout, const scalar_t* x, const scalar_t* y,
                                      const acc_t* gate, const acc_t* dv, const acc_t* mu,
                                      const acc_t* z, const int64_t* k, const acc_t* stats,
                                      scalar_t* dx, scalar_t* dy, Geometry g) {
  MA_GRID_STRIDE(i, g.rows * g.L) {
    int64_t row, l;
    locate(g, i, row, l);
    const acc_t* st = stats + row * kNumBackwardStats;
    const acc_t gr = gate[row], dvr = dv[row], mean_grad = dvr / acc_t(g.L);
    const acc_t s = gr * st[kS1] + mean_grad * st[kS2] + dvr * st[kAmAtMax];
    const acc_t pool_grad = mean_grad + (l == k[row] ? dvr : acc_t(0));
    const acc_t xv = static_cast<acc_t>(x[i]), yv = static_cast<acc_t>(y[i]);
    acc_t ddx, ddy;
    mutex_backward_element(xv, yv, static_cast<acc_t>(dout[i]), attention(xv, yv, mu[row], acc_t(1) / z[row]),
                           gr, pool_grad, s, ddx, ddy);
    dx[i] = static_cast<scalar_t>(ddx);
    dy[i] = static_cast<scalar_t>(ddy);
  }
}

// ------------------------------------------------------------------ launching
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

dim3 element_grid(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return dim3(static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8));
}

template <typename acc_t>
size_t row_smem(const RowLaunch& rl, int values, bool with_index) {
  return static_cast<size_t>(rl.threads()) * (values * sizeof(acc_t) + (with_index ? sizeof(int64_t) : 0));
}

dim3 row_grid(const Geometry& g, const RowLaunch& rl) {
  return dim3(static_cast<unsigned>((g.rows + rl.rows_per_block - 1) / rl.rows_per_block));
}

std::tuple<Tensor, Tensor, Tensor> mab_forward(const Tensor& x_in, const Tensor& y_in) {
  check_same(x_in, y_in, "x", "y");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = prepare(x_in);
  check_positions(x.g.rows, x.g.L, "mab_forward");
  Tensor y = same_layout(y_in, x), am = new_like(x);
  auto acc = acc_type(x.t);
  Tensor mu = per_row(x.t, acc), z = per_row(x.t, acc);
  if (x.g.rows * x.g.L == 0) return {am, mu, z};
  const RowLaunch rl = row_launch(x.g);
  MA_DISPATCH(x.t, "mab_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mab_forward_kernel<scalar_t, acc_t><<<row_grid(x.g, rl), rl.threads(), row_smem<acc_t>(rl, 2, false), stream()>>>(
        in<scalar_t>(x.t), in<scalar_t>(y), out<scalar_t>(am), out<acc_t>(mu), out<acc_t>(z), x.g,
        rl.lanes, rl.rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {am, mu, z};
}

std::tuple<Tensor, Tensor> mab_backward(const Tensor& dam_in, const Tensor& x_in, const Tensor& y_in,
                                        const Tensor& mu_in, const Tensor& z_in) {
  check_same(x_in, y_in, "x", "y");
  check_same(dam_in, x_in, "dam", "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = prepare(x_in);
  check_positions(x.g.rows, x.g.L, "mab_backward");
  Tensor y = same_layout(y_in, x), dam = same_layout(dam_in, x), dx = new_like(x), dy = new_like(x);
  auto acc = acc_type(x.t);
  Tensor mu = row_tensor(mu_in, x.t, acc, "row_max"), z = row_tensor(z_in, x.t, acc, "row_sum");
  if (x.g.rows * x.g.L == 0) return {dx, dy};
  const RowLaunch rl = row_launch(x.g);
  MA_DISPATCH(x.t, "mab_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mab_backward_kernel<scalar_t, acc_t><<<row_grid(x.g, rl), rl.threads(), row_smem<acc_t>(rl, 1, false), stream()>>>(
        in<scalar_t>(dam), in<scalar_t>(x.t), in<scalar_t>(y), in<acc_t>(mu), in<acc_t>(z),
        out<scalar_t>(dx), out<scalar_t>(dy), x.g, rl.lanes, rl.rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dy};
}

std::tuple<Tensor, Tensor> fab_pool(const Tensor& am_in, const Tensor& y_in) {
  check_same(am_in, y_in, "am", "y");
  c10::cuda::CUDAGuard guard(am_in.device());
  auto am = prepare(am_in);
  Tensor y = same_layout(y_in, am);
  check_positions(am.g.rows, am.g.L, "fab_pool");
  Tensor v = per_row(am.t, acc_type(am.t)), k = per_row(am.t, at::kLong);
  if (am.g.rows == 0) return {v, k};
  const RowLaunch rl = row_launch(am.g);
  MA_DISPATCH(am.t, "fab_pool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fab_pool_kernel<scalar_t, acc_t><<<row_grid(am.g, rl), rl.threads(), row_smem<acc_t>(rl, 2, true), stream()>>>(
        in<scalar_t>(am.t), in<scalar_t>(y), out<acc_t>(v), out<int64_t>(k), am.g, rl.lanes,
        rl.rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {v, k};
}

Tensor fab_pool_backward(const Tensor& dv_in, const Tensor& k_in, const Tensor& like) {
  check_4d(like, "like");
  c10::cuda::CUDAGuard guard(like.device());
  auto acc = acc_type(like);
  Tensor dv = row_tensor(dv_in, like, acc, "dv"), k = row_tensor(k_in, like, at::kLong, "argmax");
  const int64_t rows = like.size(0) * like.size(1), L = like.size(2) * like.size(3);
  Tensor dmix = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows * L == 0) return dmix;
  MA_DISPATCH(like, "fab_pool_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fab_pool_backward_kernel<scalar_t, acc_t><<<element_grid(rows * L), 256, 0, stream()>>>(
        in<acc_t>(dv), in<int64_t>(k), out<scalar_t>(dmix), rows, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dmix;
}

Tensor fab_blend(const Tensor& am_in, const Tensor& y_in, const Tensor& gate_in) {
  check_same(am_in, y_in, "am", "y");
  c10::cuda::CUDAGuard guard(am_in.device());
  auto am = prepare(am_in);
  Tensor y = same_layout(y_in, am), result = new_like(am);
  Tensor gate = row_tensor(gate_in, am.t, acc_type(am.t), "gate");
  if (am.g.rows * am.g.L == 0) return result;
  MA_DISPATCH(am.t, "fab_blend", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fab_blend_kernel<scalar_t, acc_t><<<element_grid(am.g.rows * am.g.L), 256, 0, stream()>>>(
        in<scalar_t>(am.t), in<scalar_t>(y), in<acc_t>(gate), out<scalar_t>(result), am.g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

std::tuple<Tensor, Tensor, Tensor> fab_blend_backward(const Tensor& dout_in, const Tensor& am_in,
                                                      const Tensor& y_in, const Tensor& gate_in) {
  check_same(am_in, y_in, "am", "y");
  check_same(dout_in, am_in, "dout", "am");
  c10::cuda::CUDAGuard guard(am_in.device());
  auto am = prepare(am_in);
  Tensor y = same_layout(y_in, am), dout = same_layout(dout_in, am);
  auto acc = acc_type(am.t);
  Tensor gate = row_tensor(gate_in, am.t, acc, "gate");
  Tensor dam = new_like(am), dy = new_like(am), dgate = per_row(am.t, acc);
  if (am.g.rows * am.g.L == 0) return {dam, dy, dgate.zero_()};
  const RowLaunch rl = row_launch(am.g);
  MA_DISPATCH(am.t, "fab_blend_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fab_blend_backward_kernel<scalar_t, acc_t><<<row_grid(am.g, rl), rl.threads(), row_smem<acc_t>(rl, 1, false), stream()>>>(
        in<scalar_t>(dout), in<scalar_t>(am.t), in<scalar_t>(y), in<acc_t>(gate), out<scalar_t>(dam),
        out<scalar_t>(dy), out<acc_t>(dgate), am.g, rl.lanes, rl.rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dam, dy, dgate};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mutex_attention_stats(const Tensor& x_in, const Tensor& y_in) {
  check_same(x_in, y_in, "x", "y");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = prepare(x_in);
  Tensor y = same_layout(y_in, x);
  check_positions(x.g.rows, x.g.L, "mutex_attention_stats");
  auto acc = acc_type(x.t);
  Tensor v = per_row(x.t, acc), mu = per_row(x.t, acc), z = per_row(x.t, acc), k = per_row(x.t, at::kLong);
  if (x.g.rows == 0) return {v, mu, z, k};
  const RowLaunch rl = row_launch(x.g);
  MA_DISPATCH(x.t, "mutex_attention_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t, acc_t><<<row_grid(x.g, rl), rl.threads(), row_smem<acc_t>(rl, 2, true), stream()>>>(
        in<scalar_t>(x.t), in<scalar_t>(y), out<acc_t>(v), out<acc_t>(mu), out<acc_t>(z),
        out<int64_t>(k), x.g, rl.lanes, rl.rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {v, mu, z, k};
}

Tensor mutex_attention_apply(const Tensor& x_in, const Tensor& y_in, const Tensor& gate_in,
                             const Tensor& mu_in, const Tensor& z_in) {
  check_same(x_in, y_in, "x", "y");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = prepare(x_in);
  Tensor y = same_layout(y_in, x), result = new_like(x);
  auto acc = acc_type(x.t);
  Tensor gate = row_tensor(gate_in, x.t, acc, "gate"), mu = row_tensor(mu_in, x.t, acc, "row_max"),
         z = row_tensor(z_in, x.t, acc, "row_sum");
  if (x.g.rows * x.g.L == 0) return result;
  MA_DISPATCH(x.t, "mutex_attention_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    apply_kernel<scalar_t, acc_t><<<element_grid(x.g.rows * x.g.L), 256, 0, stream()>>>(
        in<scalar_t>(x.t), in<scalar_t>(y), in<acc_t>(gate), in<acc_t>(mu), in<acc_t>(z),
        out<scalar_t>(result), x.g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

Tensor mutex_attention_backward_stats(const Tensor& dout_in, const Tensor& x_in, const Tensor& y_in,
                                      const Tensor& mu_in, const Tensor& z_in, const Tensor& k_in) {
  check_same(x_in, y_in, "x", "y");
  check_same(dout_in, x_in, "dout", "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = prepare(x_in);
  check_positions(x.g.rows, x.g.L, "mutex_attention backward");
  Tensor y = same_layout(y_in, x), dout = same_layout(dout_in, x);
  auto acc = acc_type(x.t);
  Tensor mu = row_tensor(mu_in, x.t, acc, "row_max"), z = row_tensor(z_in, x.t, acc, "row_sum"),
         k = row_tensor(k_in, x.t, at::kLong, "argmax");
  Tensor stats = per_row(x.t, acc, kNumBackwardStats);
  if (x.g.rows == 0) return stats;
  const RowLaunch rl = row_launch(x.g);
  MA_DISPATCH(x.t, "mutex_attention_backward_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_stats_kernel<scalar_t, acc_t><<<row_grid(x.g, rl), rl.threads(), row_smem<acc_t>(rl, 3, false), stream()>>>(
        in<scalar_t>(dout), in<scalar_t>(x.t), in<scalar_t>(y), in<acc_t>(mu), in<acc_t>(z),
        in<int64_t>(k), out<acc_t>(stats), x.g, rl.lanes, rl.rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return stats;
}

std::tuple<Tensor, Tensor> mutex_attention_backward_apply(
    const Tensor& dout_in, const Tensor& x_in, const Tensor& y_in, const Tensor& gate_in,
    const Tensor& dv_in, const Tensor& mu_in, const Tensor& z_in, const Tensor& k_in,
    const Tensor& stats_in) {
  check_same(x_in, y_in, "x", "y");
  check_same(dout_in, x_in, "dout", "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = prepare(x_in);
  check_positions(x.g.rows, x.g.L, "mutex_attention backward");
  Tensor y = same_layout(y_in, x), dout = same_layout(dout_in, x), dx = new_like(x), dy = new_like(x);
  auto acc = acc_type(x.t);
  Tensor gate = row_tensor(gate_in, x.t, acc, "gate"), dv = row_tensor(dv_in, x.t, acc, "dv"),
         mu = row_tensor(mu_in, x.t, acc, "row_max"), z = row_tensor(z_in, x.t, acc, "row_sum"),
         k = row_tensor(k_in, x.t, at::kLong, "argmax"),
         stats = row_tensor(stats_in, x.t, acc, "backward_stats", kNumBackwardStats);
  if (x.g.rows * x.g.L == 0) return {dx, dy};
  MA_DISPATCH(x.t, "mutex_attention_backward_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_apply_kernel<scalar_t, acc_t><<<element_grid(x.g.rows * x.g.L), 256, 0, stream()>>>(
        in<scalar_t>(dout), in<scalar_t>(x.t), in<scalar_t>(y), in<acc_t>(gate), in<acc_t>(dv),
        in<acc_t>(mu), in<acc_t>(z), in<int64_t>(k), in<acc_t>(stats), out<scalar_t>(dx),
        out<scalar_t>(dy), x.g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dy};
}

}  // namespace

TORCH_LIBRARY_IMPL(mutex_attn, CUDA, m) { MUTEX_ATTN_IMPL_ALL_OPS(m); }

}  // namespace mutex_attn

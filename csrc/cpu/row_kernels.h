// The CPU row kernels: plain templates over raw pointers, one row (sample, channel) of L
// positions at a time, rows [r0, r1) per call. No torch types, so that kernels.cpp (which
// adds the op glue: checks, allocation, dispatch, at::parallel_for) and the stand-alone
// micro-benchmark benchmarks/row_kernels_bench.cpp compile exactly the same code.
// Inner loops are written for the compiler to vectorize (`omp simd`); accumulation in acc_t.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../row_math.h"

namespace mutex_attn {
namespace cpu_rows {

// mu = max d over one row.
template <typename scalar_t, typename acc_t>
acc_t row_max_dist(const scalar_t* x, const scalar_t* y, int64_t L) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t l = 0; l < L; ++l) {
    acc_t d = sq_dist(acc_t(x[l]), acc_t(y[l]));
    m = d > m ? d : m;
  }
  return m;
}

// mu = max d and Z = Σ e^(d − mu) over one row.
template <typename scalar_t, typename acc_t>
void softmax_stats(const scalar_t* x, const scalar_t* y, int64_t L, acc_t& mu, acc_t& z) {
  const acc_t m = row_max_dist<scalar_t, acc_t>(x, y, L);
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t l = 0; l < L; ++l) s += exp_softmax(sq_dist(acc_t(x[l]), acc_t(y[l])) - m);
  mu = m;
  z = s;
}

// The first position of `value` in a row (0 when absent: a NaN row, whose v is NaN anyway).
// Chunks of 64 are tested with a vectorized OR before the scalar scan: a plain early-exit
// loop stays scalar and cost as much as the rest of K1.
template <typename acc_t>
int64_t first_index_of(const acc_t* row, int64_t L, acc_t value) {
  constexpr int64_t kChunk = 64;
  for (int64_t c = 0; c < L; c += kChunk) {
    const int64_t end = std::min(L, c + kChunk);
    int found = 0;
#pragma omp simd reduction(| : found)
    for (int64_t l = c; l < end; ++l) found |= row[l] == value;
    if (found)
      for (int64_t l = c; l < end; ++l)
        if (row[l] == value) return l;
  }
  return 0;
}

// v = mean + max of a row already written to `mix`, and the first index of the max.
template <typename acc_t>
void pool_row(const acc_t* mix, int64_t L, acc_t& v, int64_t& k) {
  acc_t sum = 0, best = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(+ : sum) reduction(max : best)
  for (int64_t l = 0; l < L; ++l) {
    sum += mix[l];
    best = mix[l] > best ? mix[l] : best;
  }
  k = first_index_of(mix, L, best);
  v = sum / acc_t(L) + best;  // NaN in the row reaches v through the sum
}

// ---------------------------------------------------------------- row kernels
// Each processes rows [r0, r1) of NCHW-contiguous data, L positions a row. They are plain
// templates (not lambdas inside AT_DISPATCH) so that `#pragma omp simd` reaches the loops:
// GCC misplaces _Pragma inside macro arguments, and the loops then stay scalar.
#define MA_RESTRICT __restrict__

template <typename scalar_t, typename acc_t>
void mab_forward_rows(const scalar_t* MA_RESTRICT x, const scalar_t* MA_RESTRICT y,
                      scalar_t* MA_RESTRICT am, acc_t* mu_out, acc_t* z_out, int64_t L,
                      int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t *xr = x + r * L, *yr = y + r * L;
    scalar_t* out = am + r * L;
    acc_t mu, z;
    softmax_stats(xr, yr, L, mu, z);
    const acc_t inv_z = acc_t(1) / z;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      acc_t yv = yr[l];
      out[l] = static_cast<scalar_t>(attention<acc_t>(xr[l], yv, mu, inv_z) * yv);
    }
    mu_out[r] = mu;
    z_out[r] = z;
  }
}

template <typename scalar_t, typename acc_t>
void mab_backward_rows(const scalar_t* MA_RESTRICT dam, const scalar_t* MA_RESTRICT x,
                       const scalar_t* MA_RESTRICT y, const acc_t* mu_in, const acc_t* z_in,
                       scalar_t* MA_RESTRICT dx, scalar_t* MA_RESTRICT dy, int64_t L, int64_t r0,
                       int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * L;
    const scalar_t *xr = x + o, *yr = y + o, *gr = dam + o;
    scalar_t *dxr = dx + o, *dyr = dy + o;
    const acc_t mu = mu_in[r], inv_z = acc_t(1) / z_in[r];
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t l = 0; l < L; ++l) {
      acc_t yv = yr[l];
      s += attention<acc_t>(xr[l], yv, mu, inv_z) * acc_t(gr[l]) * yv;
    }
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      acc_t xv = xr[l], yv = yr[l], ddx, ddy;
      mab_backward_element<acc_t>(xv, yv, gr[l], attention<acc_t>(xv, yv, mu, inv_z), s, ddx, ddy);
      dxr[l] = static_cast<scalar_t>(ddx);
      dyr[l] = static_cast<scalar_t>(ddy);
    }
  }
}

template <typename scalar_t, typename acc_t>
void fab_pool_rows(const scalar_t* MA_RESTRICT am, const scalar_t* MA_RESTRICT y, acc_t* v,
                   int64_t* k, int64_t L, int64_t r0, int64_t r1) {
  std::vector<acc_t> mix(L);
  acc_t* MA_RESTRICT m = mix.data();
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t *ar = am + r * L, *yr = y + r * L;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) m[l] = acc_t(ar[l]) + acc_t(yr[l]);
    pool_row(m, L, v[r], k[r]);
  }
}

template <typename scalar_t, typename acc_t>
void fab_pool_backward_rows(const acc_t* dv, const int64_t* k, scalar_t* MA_RESTRICT dmix,
                            int64_t L, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const bool valid = valid_position(k[r], L);
    const acc_t mean_grad = valid ? dv[r] / acc_t(L) : std::numeric_limits<acc_t>::quiet_NaN();
    const scalar_t fill = static_cast<scalar_t>(mean_grad);
    scalar_t* out = dmix + r * L;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) out[l] = fill;
    if (valid) out[k[r]] = static_cast<scalar_t>(mean_grad + dv[r]);
  }
}

template <typename scalar_t, typename acc_t>
void fab_blend_rows(const scalar_t* MA_RESTRICT am, const scalar_t* MA_RESTRICT y,
                    const acc_t* gate, scalar_t* MA_RESTRICT out, int64_t L, int64_t r0,
                    int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * L;
    const scalar_t *ar = am + o, *yr = y + o;
    scalar_t* outr = out + o;
    const acc_t g = gate[r];
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      acc_t yv = yr[l];
      outr[l] = static_cast<scalar_t>(yv + g * (acc_t(ar[l]) - yv));
    }
  }
}

template <typename scalar_t, typename acc_t>
void fab_blend_backward_rows(const scalar_t* MA_RESTRICT dout, const scalar_t* MA_RESTRICT am,
                             const scalar_t* MA_RESTRICT y, const acc_t* gate,
                             scalar_t* MA_RESTRICT dam, scalar_t* MA_RESTRICT dy, acc_t* dgate,
                             int64_t L, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * L;
    const scalar_t *gr = dout + o, *ar = am + o, *yr = y + o;
    scalar_t *damr = dam + o, *dyr = dy + o;
    const acc_t g = gate[r];
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t l = 0; l < L; ++l) {
      acc_t go = gr[l];
      sum += go * (acc_t(ar[l]) - acc_t(yr[l]));
      damr[l] = static_cast<scalar_t>(g * go);
      dyr[l] = static_cast<scalar_t>((acc_t(1) - g) * go);
    }
    dgate[r] = sum;
  }
}

// Prefetch the elements [p, p + n) into L1 (n·sizeof(T) bytes, one request per 64-byte line).
template <int n, typename T>
inline void prefetch_elements(const T* p) {
  for (int b = 0; b < n * int(sizeof(T)); b += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 0, 3);
}

// K1: per row mu (sweep 1), e = e^(d − mu) and Z (sweep 2, e kept in a row buffer), then
// mix = y + y·e/Z for v = mean + max and k (sweep 3, no exp). One exp per element.
// Sweep 1 waits on memory and sweep 2 on the exp, so sweep 2 prefetches the next row's x and
// y, a line per 16 elements, for the next sweep 1 (row_kernels_bench, stage 1, 1024 rows:
// K1 12-16% faster; the same prefetch in the single-sweep K3 gained nothing).
template <typename scalar_t, typename acc_t>
void stats_rows(const scalar_t* MA_RESTRICT x, const scalar_t* MA_RESTRICT y, acc_t* v,
                acc_t* mu_out, acc_t* z_out, int64_t* k, int64_t L, int64_t r0, int64_t r1) {
  constexpr int kChunk = 16;  // elements per prefetch step; lane l % 16 sums Z's part
  std::vector<acc_t> buffer(L);
  acc_t* MA_RESTRICT e = buffer.data();
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t *xr = x + r * L, *yr = y + r * L;
    const int64_t next = r + 1 < r1 ? L : 0;  // (the last row prefetches itself: a no-op)
    const acc_t mu = row_max_dist<scalar_t, acc_t>(xr, yr, L);
    acc_t lanes[kChunk] = {};
    int64_t l = 0;
    for (; l + kChunk <= L; l += kChunk) {
      prefetch_elements<kChunk>(xr + next + l);
      prefetch_elements<kChunk>(yr + next + l);
#pragma omp simd
      for (int i = 0; i < kChunk; ++i) {
        e[l + i] = exp_softmax(sq_dist(acc_t(xr[l + i]), acc_t(yr[l + i])) - mu);
        lanes[i] += e[l + i];
      }
    }
    acc_t z = 0;
    for (; l < L; ++l) {
      e[l] = exp_softmax(sq_dist(acc_t(xr[l]), acc_t(yr[l])) - mu);
      z += e[l];
    }
    for (int i = 0; i < kChunk; ++i) z += lanes[i];
    const acc_t inv_z = acc_t(1) / z;
    acc_t sum = 0, best = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(+ : sum) reduction(max : best)
    for (int64_t l = 0; l < L; ++l) {
      acc_t yv = yr[l];
      acc_t mix = e[l] * inv_z * yv + yv;
      e[l] = mix;
      sum += mix;
      best = mix > best ? mix : best;
    }
    k[r] = first_index_of(e, L, best);
    v[r] = sum / acc_t(L) + best;  // NaN in the row reaches v through the sum
    mu_out[r] = mu;
    z_out[r] = z;
  }
}

// K2: out = y + g (A·y − y).
template <typename scalar_t, typename acc_t>
void apply_rows(const scalar_t* MA_RESTRICT x, const scalar_t* MA_RESTRICT y, const acc_t* gate,
                const acc_t* mu_in, const acc_t* z_in, scalar_t* MA_RESTRICT out, int64_t L,
                int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * L;
    const scalar_t *xr = x + o, *yr = y + o;
    scalar_t* outr = out + o;
    const acc_t g = gate[r], mu = mu_in[r], inv_z = acc_t(1) / z_in[r];
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      acc_t yv = yr[l];
      acc_t a = attention<acc_t>(xr[l], yv, mu, inv_z);
      outr[l] = static_cast<scalar_t>(yv + g * (a * yv - yv));
    }
  }
}

// K3: the row scalars of BackwardStat (S1, Σ dout·y, S2, A_k·y_k).
template <typename scalar_t, typename acc_t>
void backward_stats_rows(const scalar_t* MA_RESTRICT dout, const scalar_t* MA_RESTRICT x,
                         const scalar_t* MA_RESTRICT y, const acc_t* mu_in, const acc_t* z_in,
                         const int64_t* k, acc_t* stats, int64_t L, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * L;
    const scalar_t *gr = dout + o, *xr = x + o, *yr = y + o;
    const acc_t mu = mu_in[r], inv_z = acc_t(1) / z_in[r];
    acc_t s1 = 0, dout_y = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, dout_y, s2)
    for (int64_t l = 0; l < L; ++l) {
      acc_t yv = yr[l], go = gr[l];
      acc_t am = attention<acc_t>(xr[l], yv, mu, inv_z) * yv;
      s1 += am * go;
      dout_y += go * yv;
      s2 += am;
    }
    acc_t* row = stats + r * kNumBackwardStats;
    row[kS1] = s1;
    row[kDoutY] = dout_y;
    row[kS2] = s2;
    row[kAmAtMax] = valid_position(k[r], L)
                        ? attention<acc_t>(xr[k[r]], yr[k[r]], mu, inv_z) * acc_t(yr[k[r]])
                        : std::numeric_limits<acc_t>::quiet_NaN();
  }
}

// K4: dx, dy in one sweep, from the K3 scalars and dv (from the gate network's backward).
template <typename scalar_t, typename acc_t>
inline void backward_apply_element(const scalar_t* x, const scalar_t* y, const scalar_t* dout,
                                   scalar_t* dx, scalar_t* dy, int64_t l, acc_t mu, acc_t inv_z,
                                   acc_t g, acc_t pool_grad, acc_t s) {
  acc_t xv = x[l], yv = y[l], ddx, ddy;
  mutex_backward_element<acc_t>(xv, yv, dout[l], attention<acc_t>(xv, yv, mu, inv_z), g,
                                pool_grad, s, ddx, ddy);
  dx[l] = static_cast<scalar_t>(ddx);
  dy[l] = static_cast<scalar_t>(ddy);
}

template <typename scalar_t, typename acc_t>
void backward_apply_rows(const scalar_t* MA_RESTRICT dout, const scalar_t* MA_RESTRICT x,
                         const scalar_t* MA_RESTRICT y, const acc_t* gate, const acc_t* dv,
                         const acc_t* mu_in, const acc_t* z_in, const int64_t* k,
                         const acc_t* stats, scalar_t* MA_RESTRICT dx, scalar_t* MA_RESTRICT dy,
                         int64_t L, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * L;
    const scalar_t *gr = dout + o, *xr = x + o, *yr = y + o;
    scalar_t *dxr = dx + o, *dyr = dy + o;
    const acc_t* st = stats + r * kNumBackwardStats;
    const acc_t g = gate[r], dvr = dv[r], mean_grad = dvr / acc_t(L);
    const acc_t mu = mu_in[r], inv_z = acc_t(1) / z_in[r];
    const acc_t s = g * st[kS1] + mean_grad * st[kS2] + dvr * st[kAmAtMax];
#pragma omp simd
    for (int64_t l = 0; l < L; ++l)
      backward_apply_element(xr, yr, gr, dxr, dyr, l, mu, inv_z, g, mean_grad, s);
    // The max also routes dv to the first argmax position.
    if (valid_position(k[r], L))  // (otherwise s, and the whole row, is NaN already)
      backward_apply_element(xr, yr, gr, dxr, dyr, k[r], mu, inv_z, g, mean_grad + dvr, s);
  }
}

// ---------------------------------------------------------------- channels_last (NHWC)
// The fused-path kernels K1..K4 for channels_last data, read in place. A row (n, c) is then
// strided by C, so instead of one row at a time these work on a block of up to `lanes`
// neighbouring channels of one sample: at each position the block's values are contiguous
// and the inner loop over channels vectorizes, one row per SIMD lane. The rows' reductions run
// position by position, in one fixed order per row (results are bitwise reproducible; they
// differ from the NCHW kernels' in the last bits, as their sums are ordered differently).
// Work units: u = n · blocks + b, channels [b·lanes, min(C, (b+1)·lanes)).
constexpr int kStatsLanes = 16;  // K1 sweeps its block three times: [L, 16] stays in L2
                                 // (and wider blocks measured no faster)
// K2..K4 sweep their block once and take the block width `lanes` as an argument, up to
// kMaxSweepLanes: the wider the block, the longer the contiguous run read at each position
// (64 B at 16 lanes; row_kernels_bench, stage 1, one thread: K2 2.1 -> 0.63 ns per position
// from 16 to 256 lanes, K4 3.3 -> 1.1). Each lane's row is reduced in the same order at
// any width, so the width never changes a result.
constexpr int kMaxSweepLanes = 256;

inline int64_t channel_blocks(int64_t C, int lanes) { return (C + lanes - 1) / lanes; }

struct Block {
  int64_t base;  // offset of element (n, c0, position 0)
  int64_t row0;  // row index n·C + c0 of the first lane
  int lanes;     // channels in this block
};

inline Block block_of(int64_t u, int64_t C, int64_t L, int lanes) {
  const int64_t blocks = channel_blocks(C, lanes), n = u / blocks, c0 = (u % blocks) * lanes;
  return {n * L * C + c0, n * C + c0, static_cast<int>(std::min<int64_t>(lanes, C - c0))};
}

// K1 on channels_last: per lane mu, then e and Z (e kept in a [L, kStatsLanes] buffer), then
// mix = y + y·e/Z for v = mean + max and the first argmax k (a strictly greater value moves k).
template <typename scalar_t, typename acc_t>
void stats_nhwc(const scalar_t* MA_RESTRICT x, const scalar_t* MA_RESTRICT y, acc_t* v,
                acc_t* mu_out, acc_t* z_out, int64_t* k, int64_t C, int64_t L, int64_t u0,
                int64_t u1) {
  std::vector<acc_t> buffer(L * kStatsLanes);
  acc_t* MA_RESTRICT e = buffer.data();
  for (int64_t u = u0; u < u1; ++u) {
    const Block b = block_of(u, C, L, kStatsLanes);
    const int nc = b.lanes;
    const scalar_t *xb = x + b.base, *yb = y + b.base;
    acc_t mu[kStatsLanes], z[kStatsLanes], sum[kStatsLanes], best[kStatsLanes];
    int64_t at[kStatsLanes];
    for (int c = 0; c < kStatsLanes; ++c) {
      mu[c] = best[c] = -std::numeric_limits<acc_t>::infinity();
      z[c] = sum[c] = 0;
      at[c] = 0;
    }
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t *xl = xb + l * C, *yl = yb + l * C;
#pragma omp simd
      for (int c = 0; c < nc; ++c) {
        const acc_t d = sq_dist(acc_t(xl[c]), acc_t(yl[c]));
        mu[c] = d > mu[c] ? d : mu[c];
      }
    }
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t *xl = xb + l * C, *yl = yb + l * C;
      acc_t* el = e + l * kStatsLanes;
#pragma omp simd
      for (int c = 0; c < nc; ++c) {
        el[c] = exp_softmax(sq_dist(acc_t(xl[c]), acc_t(yl[c])) - mu[c]);
        z[c] += el[c];
      }
    }
    acc_t inv_z[kStatsLanes];
    for (int c = 0; c < kStatsLanes; ++c) inv_z[c] = acc_t(1) / z[c];
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t* yl = yb + l * C;
      const acc_t* el = e + l * kStatsLanes;
#pragma omp simd
      for (int c = 0; c < nc; ++c) {
        const acc_t yv = yl[c];
        const acc_t mix = el[c] * inv_z[c] * yv + yv;
        sum[c] += mix;
        const bool higher = mix > best[c];
        best[c] = higher ? mix : best[c];
        at[c] = higher ? l : at[c];
      }
    }
    for (int c = 0; c < nc; ++c) {
      const int64_t r = b.row0 + c;
      v[r] = sum[c] / acc_t(L) + best[c];  // NaN in the row reaches v through the sum
      k[r] = at[c];
      mu_out[r] = mu[c];
      z_out[r] = z[c];
    }
  }
}

// K2 on channels_last: out = y + g (A·y − y).
template <typename scalar_t, typename acc_t>
void apply_nhwc(const scalar_t* MA_RESTRICT x, const scalar_t* MA_RESTRICT y, const acc_t* gate,
                const acc_t* mu_in, const acc_t* z_in, scalar_t* MA_RESTRICT out, int64_t C,
                int64_t L, int lanes, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const Block b = block_of(u, C, L, lanes);
    const int nc = b.lanes;
    acc_t g[kMaxSweepLanes] = {}, mu[kMaxSweepLanes] = {}, inv_z[kMaxSweepLanes] = {};
    for (int c = 0; c < nc; ++c) {
      g[c] = gate[b.row0 + c];
      mu[c] = mu_in[b.row0 + c];
      inv_z[c] = acc_t(1) / z_in[b.row0 + c];
    }
    for (int64_t l = 0; l < L; ++l) {
      const int64_t o = b.base + l * C;
      const scalar_t *xl = x + o, *yl = y + o;
      scalar_t* outl = out + o;
#pragma omp simd
      for (int c = 0; c < nc; ++c) {
        const acc_t yv = yl[c];
        const acc_t a = attention<acc_t>(xl[c], yv, mu[c], inv_z[c]);
        outl[c] = static_cast<scalar_t>(yv + g[c] * (a * yv - yv));
      }
    }
  }
}

// K3 on channels_last: the row scalars of BackwardStat.
template <typename scalar_t, typename acc_t>
void backward_stats_nhwc(const scalar_t* MA_RESTRICT dout, const scalar_t* MA_RESTRICT x,
                         const scalar_t* MA_RESTRICT y, const acc_t* mu_in, const acc_t* z_in,
                         const int64_t* k, acc_t* stats, int64_t C, int64_t L, int lanes,
                         int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const Block b = block_of(u, C, L, lanes);
    const int nc = b.lanes;
    acc_t mu[kMaxSweepLanes] = {}, inv_z[kMaxSweepLanes] = {}, s1[kMaxSweepLanes] = {},
          dout_y[kMaxSweepLanes] = {}, s2[kMaxSweepLanes] = {};
    for (int c = 0; c < nc; ++c) {
      mu[c] = mu_in[b.row0 + c];
      inv_z[c] = acc_t(1) / z_in[b.row0 + c];
    }
    for (int64_t l = 0; l < L; ++l) {
      const int64_t o = b.base + l * C;
      const scalar_t *gl = dout + o, *xl = x + o, *yl = y + o;
#pragma omp simd
      for (int c = 0; c < nc; ++c) {
        const acc_t yv = yl[c], go = gl[c];
        const acc_t am = attention<acc_t>(xl[c], yv, mu[c], inv_z[c]) * yv;
        s1[c] += am * go;
        dout_y[c] += go * yv;
        s2[c] += am;
      }
    }
    for (int c = 0; c < nc; ++c) {
      const int64_t r = b.row0 + c, kr = k[r];
      acc_t* row = stats + r * kNumBackwardStats;
      row[kS1] = s1[c];
      row[kDoutY] = dout_y[c];
      row[kS2] = s2[c];
      const int64_t o = b.base + kr * C + c;
      row[kAmAtMax] = valid_position(kr, L)
                          ? attention<acc_t>(x[o], y[o], mu[c], inv_z[c]) * acc_t(y[o])
                          : std::numeric_limits<acc_t>::quiet_NaN();
    }
  }
}

// K4 on channels_last: dx, dy, then dv at each row's first argmax.
template <typename scalar_t, typename acc_t>
void backward_apply_nhwc(const scalar_t* MA_RESTRICT dout, const scalar_t* MA_RESTRICT x,
                         const scalar_t* MA_RESTRICT y, const acc_t* gate, const acc_t* dv,
                         const acc_t* mu_in, const acc_t* z_in, const int64_t* k,
                         const acc_t* stats, scalar_t* MA_RESTRICT dx, scalar_t* MA_RESTRICT dy,
                         int64_t C, int64_t L, int lanes, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const Block b = block_of(u, C, L, lanes);
    const int nc = b.lanes;
    acc_t g[kMaxSweepLanes] = {}, mean_grad[kMaxSweepLanes] = {}, mu[kMaxSweepLanes] = {},
          inv_z[kMaxSweepLanes] = {}, s[kMaxSweepLanes] = {};
    for (int c = 0; c < nc; ++c) {
      const int64_t r = b.row0 + c;
      const acc_t* st = stats + r * kNumBackwardStats;
      g[c] = gate[r];
      mean_grad[c] = dv[r] / acc_t(L);
      mu[c] = mu_in[r];
      inv_z[c] = acc_t(1) / z_in[r];
      s[c] = g[c] * st[kS1] + mean_grad[c] * st[kS2] + dv[r] * st[kAmAtMax];
    }
    for (int64_t l = 0; l < L; ++l) {
      const int64_t o = b.base + l * C;
      const scalar_t *gl = dout + o, *xl = x + o, *yl = y + o;
      scalar_t *dxl = dx + o, *dyl = dy + o;
#pragma omp simd
      for (int c = 0; c < nc; ++c) {
        const acc_t xv = xl[c], yv = yl[c];
        acc_t ddx, ddy;
        mutex_backward_element<acc_t>(xv, yv, gl[c], attention<acc_t>(xv, yv, mu[c], inv_z[c]),
                                      g[c], mean_grad[c], s[c], ddx, ddy);
        dxl[c] = static_cast<scalar_t>(ddx);
        dyl[c] = static_cast<scalar_t>(ddy);
      }
    }
    for (int c = 0; c < nc; ++c) {  // (an invalid k has made s, and the whole row, NaN)
      const int64_t r = b.row0 + c, kr = k[r];
      if (!valid_position(kr, L)) continue;
      const int64_t o = b.base + kr * C + c;
      const acc_t xv = x[o], yv = y[o];
      acc_t ddx, ddy;
      mutex_backward_element<acc_t>(xv, yv, dout[o], attention<acc_t>(xv, yv, mu[c], inv_z[c]),
                                    g[c], mean_grad[c] + dv[r], s[c], ddx, ddy);
      dx[o] = static_cast<scalar_t>(ddx);
      dy[o] = static_cast<scalar_t>(ddy);
    }
  }
}

}  // namespace cpu_rows
}  // namespace mutex_attn

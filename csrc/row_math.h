// Per-element formulas of SPEC §1, shared by the CPU and CUDA kernels so that both compute
// exactly the same thing. A "row" is one (sample, channel) pair over its L = H·W positions.
//
//   d = (x − y)²,  mu = max d,  Z = Σ e^(d − mu),  A = e^(d − mu) / Z,  am = A·y
//   mix = am + y,  v = mean(mix) + max(mix),  k = first argmax(mix),  out = y + g·(am − y)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MA_HD __host__ __device__ __forceinline__
#else
#define MA_HD inline __attribute__((always_inline))
#endif

namespace mutex_attn {

// e^x for the softmax, x = d − mu <= 0 (or NaN, or −inf). On the host a branch-free Cody–Waite
// reduction with the Cephes polynomial (about 1 ulp) that the compiler vectorizes, unlike
// std::exp; explicit fmaf because host code is built with -ffp-contract=off (see sq_dist).
// x below −87.3 gives exactly 0 (expf would give subnormals down to −103.9: below 1e-38 of
// the row's largest weight, they change nothing); NaN stays NaN without a test of its own
// (every step propagates it). x > 0 is not handled (wrong finite values): the kernels never
// make one (d <= mu exactly), only a row_max that is not the row's max, passed to an op directly.
MA_HD float exp_softmax(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float xc = x < -87.3f ? -87.3f : x;
  // t = 1.5·2^23 + round(xc·log2 e): the rounded n sits in t's low mantissa bits, so 2^n is
  // built from t's bits directly, with no float-to-int conversion (std::floor would block
  // GCC's vectorizer).
  const float t = std::fmaf(xc, 1.44269504088896341f, 12582912.0f);
  const float n = t - 12582912.0f;
  float r = std::fmaf(n, -0.693359375f, xc);
  r = std::fmaf(n, 2.12194440e-4f, r);
  float p = std::fmaf(1.9875691500e-4f, r, 1.3981999507e-3f);
  p = std::fmaf(p, r, 8.3334519073e-3f);
  p = std::fmaf(p, r, 4.1665795894e-2f);
  p = std::fmaf(p, r, 1.6666665459e-1f);
  p = std::fmaf(p, r, 5.0000001201e-1f);
  p = std::fmaf(p * r, r, r + 1.0f);
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;  // n + 127 in the exponent field: 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
#endif
}

MA_HD double exp_softmax(double x) { return std::exp(x); }

// d = (x − y)², rounded to the dtype. The row max mu is taken over these rounded values, so
// d − mu <= 0 holds exactly only if no compiler fuses the square into a later subtraction
// (an FMA keeps t·t unrounded: e^(+1e23) for d ~ 1e30). CUDA: the _rn intrinsics are never
// contracted; host code is compiled with -ffp-contract=off (setup.py).
MA_HD float sq_dist(float x, float y) {
  float t = x - y;
#if defined(__CUDA_ARCH__)
  return __fmul_rn(t, t);
#else
  return t * t;
#endif
}

MA_HD double sq_dist(double x, double y) {
  double t = x - y;
#if defined(__CUDA_ARCH__)
  return __dmul_rn(t, t);
#else
  return t * t;
#endif
}

// Attention weight A at one position, from the row statistics mu and 1/Z.
template <typename acc_t>
MA_HD acc_t attention(acc_t x, acc_t y, acc_t mu, acc_t inv_z) {
  return exp_softmax(sq_dist(x, y) - mu) * inv_z;
}

// MAB backward at one position, with s = Σ A·dam·y over the row:
//   dd = A (dam·y − s),  dx = 2 (x − y) dd,  dy = A·dam − dx
template <typename acc_t>
MA_HD void mab_backward_element(acc_t x, acc_t y, acc_t dam, acc_t a, acc_t s, acc_t& dx, acc_t& dy) {
  dx = acc_t(2) * (x - y) * a * (dam * y - s);
  dy = a * dam - dx;
}

// The fused MutexAttention backward at one position. pool_grad = dv/L, plus dv at the argmax k.
//   dam = g·dout + pool_grad,  dy = MAB's dy + (1 − g)·dout + pool_grad
template <typename acc_t>
MA_HD void mutex_backward_element(acc_t x, acc_t y, acc_t dout, acc_t a, acc_t g, acc_t pool_grad,
                                  acc_t s, acc_t& dx, acc_t& dy) {
  acc_t dam = g * dout + pool_grad;
  mab_backward_element(x, y, dam, a, s, dx, dy);
  dy += (acc_t(1) - g) * dout + pool_grad;
}

// A stored argmax must index into its row; the kernels turn a bad one into NaN rather than
// a memory error (only direct calls of the ops can pass one).
MA_HD bool valid_position(int64_t k, int64_t positions) { return k >= 0 && k < positions; }

// Row scalars K3 produces for the backward (one [N, C, 4] tensor, this order).
enum BackwardStat : int { kS1 = 0, kDoutY = 1, kS2 = 2, kAmAtMax = 3, kNumBackwardStats = 4 };
//   S1 = Σ A·dout·y,  DoutY = Σ dout·y,  S2 = Σ A·y,  AmAtMax = A_k·y_k
//   dgate = S1 − DoutY;   s = g·S1 + (dv/L)·S2 + dv·AmAtMax   (SPEC §1)

}  // namespace mutex_attn

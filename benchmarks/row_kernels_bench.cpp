// Stand-alone timing of the CPU row kernels (csrc/cpu/row_kernels.h): one thread, no torch,
// no allocator, each kernel alone on the same data, timed interleaved. On a noisy shared
// machine this separates a change to a kernel's inner loop from everything around it
// (dispatch, allocation and page faults, the other kernels, other tenants' memory traffic
// between whole-op runs), which bench_ops.py cannot.
//
//   g++ -O3 -march=native -ffp-contract=off -fopenmp -std=c++17 -Icsrc \
//       benchmarks/row_kernels_bench.cpp -o /tmp/row_kernels_bench
//   /tmp/row_kernels_bench [L=3136] [rows=256] [reps=15]
//
// With rows a multiple of 256 it also times the channels_last (NHWC) kernels on the same data
// read as [rows / 256, L, 256]; a fourth argument sets the K2..K4 channel-block width
// (16..256, default 256).
//
// Prints, per kernel, the median time per call, ns per position and the rate of the
// full-tensor streams it reads and writes (GB/s; write-allocate traffic not counted).
// (-ffp-contract=off and -fopenmp as in setup.py: the same code the extension runs.)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cpu/row_kernels.h"

using namespace mutex_attn;
using namespace mutex_attn::cpu_rows;

namespace {

struct Kernel {
  std::string name;
  int streams;  // full tensors read + written per call
  std::function<void()> run;
  std::vector<double> ms;
};

double now_ms() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t L = argc > 1 ? std::atoll(argv[1]) : 3136;
  const int64_t rows = argc > 2 ? std::atoll(argv[2]) : 256;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 15;
  if (L < 1 || rows < 1 || reps < 1 || (argc > 4 && (std::atoi(argv[4]) < 1 || std::atoi(argv[4]) > kMaxSweepLanes))) {
    std::fprintf(stderr, "usage: %s [L >= 1] [rows >= 1] [reps >= 1] [lanes 1..256]\n", argv[0]);
    return 2;
  }
  const int64_t n = L * rows;
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(0.f, 1.f);
  std::vector<float> x(n), y(n), dout(n), out(n), dx(n), dy(n);
  for (int64_t i = 0; i < n; ++i) x[i] = normal(gen), y[i] = normal(gen), dout[i] = normal(gen);
  std::vector<float> v(rows), mu(rows), z(rows), gate(rows), dv(rows), stats(rows * kNumBackwardStats);
  std::vector<int64_t> k(rows);
  for (int64_t r = 0; r < rows; ++r) gate[r] = uniform(gen), dv[r] = normal(gen);

  std::vector<Kernel> kernels = {
      {"K1 stats", 2, [&] { stats_rows<float, float>(x.data(), y.data(), v.data(), mu.data(), z.data(), k.data(), L, 0, rows); }, {}},
      {"K2 apply", 3, [&] { apply_rows<float, float>(x.data(), y.data(), gate.data(), mu.data(), z.data(), out.data(), L, 0, rows); }, {}},
      {"K3 backward stats", 3, [&] { backward_stats_rows<float, float>(dout.data(), x.data(), y.data(), mu.data(), z.data(), k.data(), stats.data(), L, 0, rows); }, {}},
      {"K4 backward apply", 5, [&] { backward_apply_rows<float, float>(dout.data(), x.data(), y.data(), gate.data(), dv.data(), mu.data(), z.data(), k.data(), stats.data(), dx.data(), dy.data(), L, 0, rows); }, {}},
  };
  // The same kernels on channels_last data ([rows / C] samples of C = 256 channels; needs rows
  // to be a multiple of 256): the NHWC variants, fed by the NHWC K1.
  const int64_t C = 256, samples = rows / C, units_stats = samples * channel_blocks(C, kStatsLanes);
  const int lanes = argc > 4 ? std::atoi(argv[4]) : kMaxSweepLanes;
  const int64_t units_sweep = samples * channel_blocks(C, lanes);
  if (samples > 0) {
    kernels.push_back({"K1 stats NHWC", 2, [&] { stats_nhwc<float, float>(x.data(), y.data(), v.data(), mu.data(), z.data(), k.data(), C, L, 0, units_stats); }, {}});
    kernels.push_back({"K2 apply NHWC", 3, [&] { apply_nhwc<float, float>(x.data(), y.data(), gate.data(), mu.data(), z.data(), out.data(), C, L, lanes, 0, units_sweep); }, {}});
    kernels.push_back({"K3 backward stats NHWC", 3, [&] { backward_stats_nhwc<float, float>(dout.data(), x.data(), y.data(), mu.data(), z.data(), k.data(), stats.data(), C, L, lanes, 0, units_sweep); }, {}});
    kernels.push_back({"K4 backward apply NHWC", 5, [&] { backward_apply_nhwc<float, float>(dout.data(), x.data(), y.data(), gate.data(), dv.data(), mu.data(), z.data(), k.data(), stats.data(), dx.data(), dy.data(), C, L, lanes, 0, units_sweep); }, {}});
  }
  for (auto& kernel : kernels) kernel.run();  // warm up; K1's statistics feed the others
  for (int rep = 0; rep < reps; ++rep)
    for (auto& kernel : kernels) {
      const double t0 = now_ms();
      kernel.run();
      kernel.ms.push_back(now_ms() - t0);
    }
  std::printf("L=%lld rows=%lld reps=%d, one thread, float32\n", (long long)L, (long long)rows, reps);
  std::printf("%-24s %10s %10s %8s\n", "kernel", "median ms", "ns/pos", "GB/s");
  for (auto& kernel : kernels) {
    std::sort(kernel.ms.begin(), kernel.ms.end());
    const double med = kernel.ms[kernel.ms.size() / 2];
    const double gbs = kernel.streams * double(n) * sizeof(float) / (med * 1e6);
    std::printf("%-24s %10.3f %10.3f %8.1f\n", kernel.name.c_str(), med, med * 1e6 / double(n), gbs);
  }
  double check = 0;  // keep the results alive
  for (int64_t i = 0; i < n; i += 97) check += out[i] + dx[i] + dy[i];
  std::printf("checksum %.6g\n", check);
  return 0;
}

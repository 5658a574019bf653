// The machine's float32 arithmetic peak, for the benchmarks' compute floors.
//
// Every thread runs independent chains of vector fused multiply-adds on registers alone: no
// memory traffic, no dependency a pipe waits on, so the rate is the most float32 arithmetic
// the cores can do. A 1024^3 BLAS matmul is no such floor: on a 2-core EPYC it ran at
// 146-183 GFLOP/s where these chains ran at 234, and attnkit's attention beat it.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int REGISTER_BYTES = 64;
#elif defined(__AVX__)
constexpr int REGISTER_BYTES = 32;
#else
constexpr int REGISTER_BYTES = 16;  // SSE, NEON
#endif
using vfloat [[gnu::vector_size(REGISTER_BYTES)]] = float;
constexpr int64_t WIDTH = REGISTER_BYTES / sizeof(float);
// Chains in flight: FMA latency (4 cycles) x pipes (2) is 8 on current x86 and ARM cores;
// 12 leaves room and fits AVX2's 16 registers.
constexpr int CHAINS = 12;

}  // namespace

// Runs `iterations` rounds of CHAINS vector FMAs on each of torch's intra-op threads, at
// once; returns the float32 FLOPs done (an FMA is 2 per lane).
double fma_flops(int64_t iterations) {
  TORCH_CHECK(iterations >= 1, "fma_flops takes iterations >= 1, got ", iterations);
  const int64_t threads = at::get_num_threads();
  // every lane of every chain is summed into its thread's result: none can be optimized away
  std::vector<float> results(threads);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t thread = begin; thread < end; ++thread) {
      vfloat acc[CHAINS];
      for (int c = 0; c < CHAINS; ++c) acc[c] = vfloat{} + float(c + thread);
      const vfloat a = vfloat{} + 0.999f, b = vfloat{} + 1e-6f;  // acc stays finite
      for (int64_t n = 0; n < iterations; ++n) {
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; ++c) acc[c] = acc[c] * a + b;
      }
      vfloat total = acc[0];
      for (int c = 1; c < CHAINS; ++c) total += acc[c];
      for (int64_t lane = 0; lane < WIDTH; ++lane) results[thread] += total[lane];
    }
  });
  volatile float sink = 0;
  for (const float r : results) sink = sink + r;
  return 2.0 * double(WIDTH) * CHAINS * double(iterations) * double(threads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fma_flops", &fma_flops, "float32 FMA chains on every thread; returns the FLOPs done");
}

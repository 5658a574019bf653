// y = x W^T (+ b) for a few rows of x: the matmul of every decode step.
//
// With one to eight rows the product is a matrix-vector product: each weight is read once
// and used for at most 2·rows flops per 4 bytes, so its speed is the memory bandwidth. BLAS
// packs W first or runs it on one thread for such shapes (measured on a 2-core machine:
// ~10 GB/s against ~35 GB/s that two threads can read). Here the output features are split
// across threads; each thread streams its rows of W once, at full vector width, with every
// row of x (which sits in L1) against it, so W moves exactly once.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "vec.h"

#include <algorithm>
#include <vector>
#include <cstdint>

namespace {

constexpr int64_t WIDTH = LANES<float>;  // floats per vector (one register)
using vfloat = Vec<float>;

// The lanes' sum, narrowing: halves added, then quarters, then scalars. Each output pays
// this once; a plain loop's 15 dependent scalar adds cost ~14% of the matmul at 16-32 rows,
// and vec.h's full-width shuffle tree (right for the decode kernel) measured 25-45% slower
// here at 8-32 rows (interleaved runs, 2 cores).
inline float sum(vfloat v) {
  typedef float v4 __attribute__((vector_size(4 * sizeof(float))));
  const Float8 a = fold_to_8_lanes(v);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Software prefetch distance: each weight row being read also asks for the bytes 64 KiB
// further on, into L2. The hardware prefetcher alone left compute and memory taking turns
// (a chain of SmolLM2's matmuls at 8 rows: 51 ms -> 24 ms with it, 1 row: 23 -> 20 ms,
// measured interleaved on 2 cores; 16-128 KiB all did within 10%).
constexpr int64_t PREFETCH_AHEAD = 64 * 1024 / sizeof(float);

// FEATS weight rows from feature `o` against R rows of x from row `r0`: FEATS x R
// independent accumulators hide the FMA latency; each step loads FEATS + R vectors for
// FEATS x R FMAs. Only the first row group (r0 == 0) prefetches: the later ones find
// these weight rows in L1.
template <int R, int FEATS>
inline void tile(const float* x, const float* w, const float* bias, float* y, int64_t in,
                 int64_t out, int64_t o, int64_t r0) {
  const int64_t vec_end = in - in % WIDTH;
  const float* w_end = w + out * in;
  vfloat acc[FEATS][R] = {};
  for (int64_t i = 0; i < vec_end; i += WIDTH) {
    if (r0 == 0 && i % (CACHE_LINE_BYTES / sizeof(float)) == 0) {  // once a line (AVX2: 2 steps)
      for (int f = 0; f < FEATS; ++f) {
        const float* ahead = w + (o + f) * in + i + PREFETCH_AHEAD;
        if (ahead < w_end) __builtin_prefetch(ahead, 0, 2);
      }
    }
    vfloat xv[R];
    for (int r = 0; r < R; ++r) xv[r] = load(x + (r0 + r) * in + i);
    for (int f = 0; f < FEATS; ++f) {
      const vfloat wv = load(w + (o + f) * in + i);
      for (int r = 0; r < R; ++r) acc[f][r] += wv * xv[r];
    }
  }
  for (int f = 0; f < FEATS; ++f) {
    const float* wr = w + (o + f) * in;
    for (int r = 0; r < R; ++r) {
      float s = sum(acc[f][r]);
      for (int64_t i = vec_end; i < in; ++i) s += wr[i] * x[(r0 + r) * in + i];
      y[(r0 + r) * out + o + f] = s + (bias ? bias[o + f] : 0.0f);
    }
  }
}

// Output features [first, last) for all `rows` rows of x. One row streams 8 weight rows
// side by side (more reads in flight); more rows take 4 weight rows at a time against
// groups of up to 4 rows of x (2 with AVX2's 16 registers: 4 x 4 accumulators and the 4
// rows would not fit), so the accumulators fit the registers and the weight rows,
// read from memory by the first group, are still in L1 for the others: W moves from memory
// once whatever the number of rows, and from 8 rows on the product is compute-bound.
template <int FEATS>
void features(const float* x, const float* w, const float* bias, float* y, int64_t in,
              int64_t out, int64_t rows, int64_t first, int64_t last) {
  constexpr int GROUP = VECTOR_REGISTERS >= 32 ? 4 : 2;
  int64_t o = first;
  for (; o + FEATS <= last; o += FEATS) {
    int64_t r0 = 0;
    for (; r0 + GROUP <= rows; r0 += GROUP) tile<GROUP, FEATS>(x, w, bias, y, in, out, o, r0);
    switch (rows - r0) {  // fewer than GROUP rows left
      case 1: tile<1, FEATS>(x, w, bias, y, in, out, o, r0); break;
      case 2: if constexpr (GROUP > 2) tile<2, FEATS>(x, w, bias, y, in, out, o, r0); break;
      case 3: if constexpr (GROUP > 3) tile<3, FEATS>(x, w, bias, y, in, out, o, r0); break;
      default: break;
    }
  }
  for (; o < last; ++o) {  // features left over
    const float* wr = w + o * in;
    for (int64_t r = 0; r < rows; ++r) {
      float s = 0.0f;
      for (int64_t i = 0; i < in; ++i) s += wr[i] * x[r * in + i];
      y[r * out + o] = s + (bias ? bias[o] : 0.0f);
    }
  }
}

constexpr int64_t MAX_ROWS = 32;
constexpr int64_t UNIT = 8;  // output features per unit of work handed to a thread

}  // namespace

namespace {

void check_operands(const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x and weight must be matrices");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "skinny_linear takes float32");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "x and weight must be contiguous");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= MAX_ROWS, "skinny_linear takes 1 to ", MAX_ROWS,
              " rows, got ", x.size(0));
  TORCH_CHECK(weight.size(1) == x.size(1), "weight has ", weight.size(1), " inputs, x has ",
              x.size(1));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == weight.size(0),
                "bias must be a contiguous float32 vector of ", weight.size(0));
  }
}

// One weight's share of the work: its blocks of UNIT output features form a contiguous
// range [first_unit, first_unit + units) of the combined index the threads split.
struct Segment {
  const float* w;
  const float* bias;
  float* y;
  int64_t out, first_unit, units;
};

}  // namespace

// y_i = x W_i^T (+ b_i) for every weight W_i: one parallel region over all their output
// features, so the q/k/v (or gate/up) projections of a layer cost one call. x (rows, in)
// float32 contiguous with rows in 1..MAX_ROWS; weights (out_i, in) float32 contiguous; biases
// None or (out_i,). The Python side checks shapes and picks this path.
std::vector<at::Tensor> skinny_linear_many(const at::Tensor& x,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<c10::optional<at::Tensor>>& biases) {
  TORCH_CHECK(weights.size() == biases.size(), "one bias (or None) per weight");
  const int64_t rows = x.size(0), in = x.size(1);
  std::vector<at::Tensor> outputs;
  std::vector<Segment> segments;
  int64_t total_units = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    check_operands(x, weights[i], biases[i]);
    const int64_t out = weights[i].size(0);
    outputs.push_back(at::empty({rows, out}, x.options()));
    const float* b = biases[i].has_value() && biases[i]->defined()
                         ? biases[i]->data_ptr<float>()
                         : nullptr;
    const int64_t units = (out + UNIT - 1) / UNIT;
    segments.push_back(
        {weights[i].data_ptr<float>(), b, outputs.back().data_ptr<float>(), out, total_units,
         units});
    total_units += units;
  }
  const float* xp = x.data_ptr<float>();
  // ~64 KiB of weight per grain: small layers stay on one thread, big ones split evenly.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024 / 4) / (UNIT * std::max<int64_t>(in, 1)));
  at::parallel_for(0, total_units, grain, [&](int64_t begin, int64_t end) {
    for (const Segment& s : segments) {
      const int64_t lo = std::max(begin, s.first_unit), hi = std::min(end, s.first_unit + s.units);
      if (lo >= hi) continue;
      const int64_t first = UNIT * (lo - s.first_unit);
      const int64_t last = std::min(UNIT * (hi - s.first_unit), s.out);
      if (rows == 1) {
        features<8>(xp, s.w, s.bias, s.y, in, s.out, rows, first, last);
      } else {
        features<4>(xp, s.w, s.bias, s.y, in, s.out, rows, first, last);
      }
    }
  });
  return outputs;
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  return skinny_linear_many(x, {weight}, {bias})[0];
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "y = x W^T (+ b) for 1 to 32 rows of x (float32)");
  m.def("skinny_linear_many", &skinny_linear_many,
        "[x W_i^T (+ b_i)] for several weights in one parallel region (float32)");
}

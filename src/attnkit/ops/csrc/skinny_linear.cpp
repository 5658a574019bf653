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

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t WIDTH = 16;  // floats per vector (one AVX-512 register, two AVX2)
typedef float vfloat __attribute__((vector_size(WIDTH * sizeof(float))));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float sum(vfloat v) {
  float s = 0.0f;
  for (int64_t i = 0; i < WIDTH; ++i) s += v[i];
  return s;
}

// Output features [first, last) for all ROWS rows of x; two features at a time, so each
// step of the inner loop has 2·ROWS independent accumulators to hide FMA latency.
template <int ROWS>
void features(const float* x, const float* w, const float* bias, float* y, int64_t in,
              int64_t out, int64_t first, int64_t last) {
  const int64_t vec_end = in - in % WIDTH;
  int64_t o = first;
  for (; o + 2 <= last; o += 2) {
    const float* w0 = w + o * in;
    const float* w1 = w0 + in;
    vfloat acc0[ROWS] = {}, acc1[ROWS] = {};
    for (int64_t i = 0; i < vec_end; i += WIDTH) {
      const vfloat a = load(w0 + i), b = load(w1 + i);
      for (int r = 0; r < ROWS; ++r) {
        const vfloat xv = load(x + r * in + i);
        acc0[r] += a * xv;
        acc1[r] += b * xv;
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      float s0 = sum(acc0[r]), s1 = sum(acc1[r]);
      for (int64_t i = vec_end; i < in; ++i) {
        s0 += w0[i] * x[r * in + i];
        s1 += w1[i] * x[r * in + i];
      }
      y[r * out + o] = s0 + (bias ? bias[o] : 0.0f);
      y[r * out + o + 1] = s1 + (bias ? bias[o + 1] : 0.0f);
    }
  }
  for (; o < last; ++o) {  // an odd feature left over
    const float* w0 = w + o * in;
    for (int r = 0; r < ROWS; ++r) {
      float s = 0.0f;
      for (int64_t i = 0; i < in; ++i) s += w0[i] * x[r * in + i];
      y[r * out + o] = s + (bias ? bias[o] : 0.0f);
    }
  }
}

using FeatureFn = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t,
                           int64_t, int64_t);
constexpr FeatureFn BY_ROWS[] = {features<1>, features<2>, features<3>, features<4>,
                                 features<5>, features<6>, features<7>, features<8>};
constexpr int64_t MAX_ROWS = 8;

}  // namespace

// x (rows, in) float32 contiguous, rows in 1..8; weight (out, in) float32 contiguous;
// bias (out,) or None. The Python side checks shapes and picks this path.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x and weight must be matrices");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "skinny_linear takes float32");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "x and weight must be contiguous");
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  TORCH_CHECK(rows >= 1 && rows <= MAX_ROWS, "skinny_linear takes 1 to 8 rows, got ", rows);
  TORCH_CHECK(weight.size(1) == in, "weight has ", weight.size(1), " inputs, x has ", in);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == out,
                "bias must be a contiguous float32 vector of ", out);
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const FeatureFn fn = BY_ROWS[rows - 1];
  // ~64 KiB of weight per grain: small layers stay on one thread, big ones split evenly.
  const int64_t grain = std::max<int64_t>(2, (64 * 1024 / 4) / std::max<int64_t>(in, 1));
  at::parallel_for(0, (out + 1) / 2, grain / 2 + 1, [&](int64_t begin, int64_t end) {
    fn(xp, wp, b, yp, in, out, 2 * begin, std::min(2 * end, out));
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "y = x W^T (+ b) for 1 to 8 rows of x (float32)");
}

// RMSNorm of a few rows: y = x / sqrt(mean(x^2) + eps) * weight, in float32.
//
// A decode step normalises one row per sequence twice per layer. torch's CPU rms_norm is a
// chain of ~6 elementwise ops (pow, mean, add, rsqrt, two muls), each a dispatch and an
// allocation: ~24 us for a 576-wide row against ~1 us of arithmetic. One pass here.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "rms_norm.h"

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rms_norm takes float32");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "x and weight must be contiguous");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "weight must be a vector as wide as x's last dim");
  const int64_t width = x.size(-1), rows = width ? x.numel() / width : 0;
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Rows are independent; only many of them (prefill) are worth a second thread.
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(width, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r)
                       rms_norm_row(xp + r * width, wp, float(eps), width, yp + r * width);
                   });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "x / sqrt(mean(x^2) + eps) * weight over the last dim (float32)");
}

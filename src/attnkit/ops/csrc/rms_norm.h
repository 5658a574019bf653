// One RMSNorm row in float32: y = x / sqrt(mean(x^2) + eps) * weight (rms_norm.cpp, and the
// fused decode block in decode_block.cpp).
#pragma once

#include <cmath>
#include <cstdint>

inline void rms_norm_row(const float* x, const float* weight, float eps, int64_t width,
                         float* y) {
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < width; ++i) squares += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(squares / width + eps);
  for (int64_t i = 0; i < width; ++i) y[i] = x[i] * inv * weight[i];
}

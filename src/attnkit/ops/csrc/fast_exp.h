// exp2 for non-positive arguments, vectorisable: the decode-attention kernel's softmax
// (decode_blocks.h) and the SwiGLU gate's sigmoid (decode_block.cpp).
#pragma once

#include <bit>
#include <cstdint>

// 2^x for x <= 0, vectorisable: x = i + f with i = round(x), |f| <= 1/2; 2^f by its Taylor
// series to degree 7 (relative error < 1e-8, below float32's resolution), 2^i through the
// exponent bits. Rounding uses the 1.5 * 2^23 trick, so no float-to-int conversion is
// needed; x below -126 gives 2^-126 (as good as 0 next to the tile's maximum, which is 1),
// and NaN stays NaN. F is float, with I = int32_t, or a vector of floats (GCC/Clang vector
// extension), with I the vector of int32_t of its lanes: the same steps lane by lane.
template <typename F, typename I>
inline F exp2_nonpositive_of(F x) {
  x = x < -126.0f ? F{} - 126.0f : x;
  constexpr float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const F shifted = x + magic;
  const F i = shifted - magic;
  const F f = x - i;
  F p = F{} + 1.5252734e-05f;
  p = p * f + 1.5403530e-04f;
  p = p * f + 1.3333558e-03f;
  p = p * f + 9.6181291e-03f;
  p = p * f + 5.5504109e-02f;
  p = p * f + 2.4022651e-01f;
  p = p * f + 6.9314718e-01f;
  p = p * f + 1.0f;
  // The low bits of `shifted` hold i + 2^22; the exponent field of 2^i is (i + 127) << 23.
  const I bits = (std::bit_cast<I>(shifted) - 0x4B400000 + 127) << 23;
  return p * std::bit_cast<F>(bits);
}
inline float exp2_nonpositive(float x) { return exp2_nonpositive_of<float, int32_t>(x); }

// x * sigmoid(x) = x / (1 + e^-x), through e^-|x| <= 1 (no overflow for either sign).
// Below x = -87 (where exp2_nonpositive stops at 2^-126) the result, |x| e^x < 1e-36, is
// 0 (-0, and NaN for -inf, as torch's x * sigmoid(x) gives).
inline float silu(float x) {
  constexpr float log2e = 1.4426950408889634f;
  const float e = exp2_nonpositive(-(x < 0 ? -x : x) * log2e);
  const float y = x * (x >= 0 ? 1.0f : e) / (1.0f + e);
  return x < -87.0f ? 0.0f * x : y;
}

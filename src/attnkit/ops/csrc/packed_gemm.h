// y = x W^T (+ b) (+ residual) for any number of rows of x, with W packed once into panels
// of two vectors' width of output features (32 with AVX-512, 16 with AVX2).
//
// A panel is (in, PANEL): for each input index, the PANEL features' weights side by side. A
// tile of R rows of x against one panel keeps R x 2 vector accumulators; each input index costs
// 2 vector loads of the panel, R scalar broadcasts of x and 2R FMAs, with no lane sums at
// the end (the row-major kernel, skinny_linear.cpp, needs a horizontal sum per output and
// reloads x per weight row). The panel is read from memory once, by the first row tile,
// which also asks for the next panel one input index at a time (prefetch spread over the
// work, not a burst); the other row tiles find it in L2. Measured on SmolLM2-135M's weights,
// 2 cores, per pass over the weights: AMD EPYC, 32 rows 196 vs 127 GFLOP/s for the
// row-major kernel, 8 rows 121 vs 86, one row 17 vs 20 ms (memory floor ~18 ms); Intel
// Xeon (AVX-512), against F.linear (MKL): 32 rows 59 vs 70 ms, 8 rows 29 vs 53, one row
// 24 vs 24 (floor ~21). Prefetching two panels ahead instead of one measured slower.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

// Used by packed_linear.cpp (one matmul or a few sharing their input) and decode_block.cpp
// (a transformer block's matmuls between its norms, RoPE and residual adds).
namespace packed_gemm {


using vfloat = Vec<float>;
constexpr int64_t WIDTH = LANES<float>;
constexpr int64_t PANEL = 2 * WIDTH;  // output features per panel
// The most rows of x a tile takes: R x 2 accumulators and the panel's 2 vectors fill 26 of
// AVX-512's 32 registers at 12 rows, 14 of AVX2's 16 at 6.
constexpr int MAX_TILE_ROWS = VECTOR_REGISTERS >= 32 ? 12 : 6;

// Input indices summed into fresh accumulators before they join the running total: a
// float32 sum over all of `in` in one accumulator errs ~4x BLAS's at in = 576; in blocks
// its error is that of a block plus that of in / BLOCK partial sums.
constexpr int64_t BLOCK = 64;

// Rows [0, R) of x against one panel, for input indices [0, in): out[r][0..PANEL).
// `next`, if set, is the panel to prefetch into L2 alongside. The row loops must unroll so
// that acc lives in registers: without the pragmas GCC 12 kept some tiles' acc on the
// stack (an FMA with a memory operand per update) and the kernel ran at half speed on a
// 2-core Xeon (120 vs 240 GFLOP/s at 64 rows).
template <int R>
inline void tile(const float* x, int64_t in, const float* panel, const float* next,
                 float (*out)[PANEL]) {
  for (int64_t i0 = 0; i0 < in || i0 == 0; i0 += BLOCK) {
    vfloat acc[R][2] = {};
    for (int64_t i = i0; i < std::min(in, i0 + BLOCK); ++i) {
      if (next) prefetch_row(next + i * PANEL, PANEL);
      const vfloat w0 = load(panel + i * PANEL), w1 = load(panel + i * PANEL + WIDTH);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * in + i];
        acc[r][0] += xv * w0;
        acc[r][1] += xv * w1;
      }
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      if (i0 > 0) {
        acc[r][0] += load(out[r]);
        acc[r][1] += load(out[r] + WIDTH);
      }
      store<float>(out[r], acc[r][0]);
      store<float>(out[r] + WIDTH, acc[r][1]);
    }
  }
}

// One weight's panels [first_panel, first_panel + panels) in the combined index the threads
// split.
struct Segment {
  const float* packed;
  const float* bias;      // (out,) or null
  const float* residual;  // (rows, out) added to the product, or null (a block's x + f(x))
  float* y;
  int64_t out, first_panel, panels;
};

// Rows [row0, row0 + rows) of x against panel p of segment s, in row tiles of 12, 8, 4, 2, 1
// rows (AVX2: 6, 4, 2, 1); only the first tile prefetches `next` (the others find this panel in
// L2).
inline void panel_product(const float* x, int64_t row0, int64_t rows, int64_t in,
                          const Segment& s, int64_t p, const float* next) {
  const float* panel = s.packed + p * in * PANEL;
  const int64_t col = p * PANEL, valid = std::min(PANEL, s.out - col);
  float out[MAX_TILE_ROWS][PANEL];
  int64_t r0 = row0;
  const int64_t end = row0 + rows;
  auto tiles_of = [&](auto size) {  // as many R-row tiles as fit, each stored (+ bias)
    constexpr int R = decltype(size)::value;
    for (; r0 + R <= end; r0 += R) {
      tile<R>(x + r0 * in, in, panel, r0 == row0 ? next : nullptr, out);
      if (valid == PANEL) {  // whole vectors (the scalar loop cost 2-4% of a pass)
        for (int r = 0; r < R; ++r) {
          const int64_t at = (r0 + r) * s.out + col;
          vfloat y0 = load(out[r]), y1 = load(out[r] + WIDTH);
          if (s.bias) y0 += load(s.bias + col), y1 += load(s.bias + col + WIDTH);
          if (s.residual) y0 += load(s.residual + at), y1 += load(s.residual + at + WIDTH);
          store<float>(s.y + at, y0);
          store<float>(s.y + at + WIDTH, y1);
        }
      } else {  // the last panel is padded: its valid columns only
        for (int r = 0; r < R; ++r) {
          const int64_t at = (r0 + r) * s.out + col;
          float* yr = s.y + at;
          for (int64_t c = 0; c < valid; ++c)
            yr[c] = out[r][c] + (s.bias ? s.bias[col + c] : 0.0f);
          if (s.residual)
            for (int64_t c = 0; c < valid; ++c) yr[c] += s.residual[at + c];
        }
      }
    }
  };
  tiles_of(std::integral_constant<int, MAX_TILE_ROWS>{});
  if constexpr (MAX_TILE_ROWS > 8) tiles_of(std::integral_constant<int, 8>{});
  tiles_of(std::integral_constant<int, 4>{});
  tiles_of(std::integral_constant<int, 2>{});
  tiles_of(std::integral_constant<int, 1>{});
}

// Rows of x one work item takes: all of them for a decode step; for a prefill, blocks whose
// slice of x (at most X_BLOCK_BYTES) stays in L2 while every panel streams past it once,
// all of a size (the threads split the items evenly: one short block left a thread idle).
// Without blocks each panel swept all of x through the cache: 4,128 rows ran at 165 GFLOP/s
// against 177 (AMD EPYC, 2 cores; 256 and 512 KiB blocks did no better than 1 MiB).
constexpr int64_t X_BLOCK_BYTES = int64_t(1) << 20;
inline int64_t row_block(int64_t rows, int64_t in) {
  const int64_t most = std::max<int64_t>(
      MAX_TILE_ROWS, X_BLOCK_BYTES / (in * int64_t(sizeof(float))) / MAX_TILE_ROWS * MAX_TILE_ROWS);
  const int64_t blocks = (rows + most - 1) / most;
  return (rows + blocks - 1) / blocks;
}

// x (rows, in) against every segment's panels, in one parallel region over (row block, panel)
// items: a layer's q/k/v (or gate/up) projections cost one call. A thread takes consecutive
// items, so it keeps its block of x while walking the panels.
inline void multiply(const float* xp, int64_t rows, int64_t in,
                     const std::vector<Segment>& segments) {
  int64_t total = 0;
  for (const Segment& s : segments) total = std::max(total, s.first_panel + s.panels);
  const int64_t block = row_block(rows, in);
  const int64_t items = total * ((rows + block - 1) / block);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % total, row0 = item / total * block;
      size_t s = 0;
      while (g >= segments[s].first_panel + segments[s].panels) ++s;
      const int64_t p = g - segments[s].first_panel;
      // The next panel this thread will take: this weight's next, the next weight's first,
      // or (at the end of a row block) the first weight's first.
      const float* next = nullptr;
      if (item + 1 < end) {
        if (p + 1 < segments[s].panels) next = segments[s].packed + (p + 1) * in * PANEL;
        else if (s + 1 < segments.size()) next = segments[s + 1].packed;
        else next = segments[0].packed;
      }
      panel_product(xp, row0, std::min(block, rows - row0), in, segments[s], p, next);
    }
  });
}

// The segment for `packed` (out real features) placed after `first_panel` panels, its
// layout checked: (panels, in, PANEL) contiguous float32.
inline Segment segment(const at::Tensor& packed, int64_t out, int64_t in, int64_t first_panel,
                       const float* bias, const float* residual, float* y) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == in && packed.size(2) == PANEL &&
                  packed.is_contiguous() && packed.scalar_type() == at::kFloat &&
                  out <= packed.size(0) * PANEL,
              "a packed weight must be (panels, ", in, ", ", PANEL, ") float32 for ", out,
              " features");
  return {packed.data_ptr<float>(), bias, residual, y, out, first_panel, packed.size(0)};
}

// (out, in) float32 contiguous -> (ceil(out / PANEL), in, PANEL), the last panel zero-padded.
inline at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat,
              "pack takes a float32 matrix");
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t panels = (out + PANEL - 1) / PANEL;
  at::Tensor padded = at::zeros({panels * PANEL, in}, weight.options());
  padded.narrow(0, 0, out).copy_(weight);
  return padded.view({panels, PANEL, in}).transpose(1, 2).contiguous();
}

}  // namespace packed_gemm

// Absorbed MLA attention for one decode step (decode_block.cpp's LatentDecodeStack): each
// query head scores the cached latents and RoPE keys directly and sums the latents, with no
// per-head K or V ever built (DeepSeek-V2 sec. 2.1.2; `layers.latent.LatentAttention`'s
// absorbed mode, whose torch path this equals up to float32 rounding).
#pragma once

#include <ATen/Parallel.h>

#include "decode_blocks.h"
#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace latent_attention {

// a · b over n floats: decode_blocks' one-query score (two accumulator chains).
inline float dot(const float* a, const float* b, int64_t n) {
  float s;
  decode_blocks::score_one_key<1, float>(a, b, n, &s, 0);
  return s;
}

// Rows of a cache laid out as blocks of tokens: token t of a sequence whose block table row
// is `table` sits at data + table[t / block_size] · block_stride + (t % block_size) ·
// token_stride (a contiguous cache: one block per slot, as big as its capacity).
struct Rows {
  const float* data;
  int64_t block_stride, token_stride;

  const float* at(const int64_t* table, int64_t block_size, int64_t t) const {
    return data + table[t / block_size] * block_stride + (t % block_size) * token_stride;
  }
};

// For sequence b and query head h (heads per RoPE key head: heads / rope_heads), over keys
// t = 0 .. starts[b] (the new token included):
//   out[b, h] = sum_t softmax_t(scale · (q_latent[b, h] · latent_t + q_rope[b, h] · key_t))
//               · latent_t
// with latent_t (kv_rank) from `latents` and key_t the head's RoPE key (rope_dim) from
// `rope_keys` (rope_heads of them per token). q_latent (batch, heads, kv_rank), q_rope
// (batch, heads, rope_dim), out (batch, heads, kv_rank), all contiguous; table (batch,
// table_cols). One (sequence, head) pair per task: the latents a sequence's heads share
// are read from L2 after the first.
inline void attend(const float* q_latent, const float* q_rope, int64_t batch, int64_t heads,
                   int64_t kv_rank, int64_t rope_heads, int64_t rope_dim, Rows latents,
                   Rows rope_keys, const int64_t* table, int64_t table_cols, int64_t block_size,
                   const int64_t* starts, float scale, float* out) {
  constexpr float log2e = 1.4426950408889634f;
  const float score_scale = scale * log2e;  // scores in base 2 for exp2_row
  const int64_t group = heads / rope_heads;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads, h = item % heads, n = starts[b] + 1;
      const int64_t* row = table + b * table_cols;
      const float* ql = q_latent + item * kv_rank;
      const float* qr = q_rope + item * rope_dim;
      const int64_t key_offset = (h / group) * rope_dim;
      // exp2_row reads whole vectors: the row rounded up to a multiple of the lanes
      scores.resize((n + LANES<float> - 1) / LANES<float> * LANES<float>);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) {
        const float s = dot(ql, latents.at(row, block_size, t), kv_rank) +
                        dot(qr, rope_keys.at(row, block_size, t) + key_offset, rope_dim);
        scores[t] = s * score_scale;
        top = std::max(top, scores[t]);
      }
      const float total = decode_blocks::exp2_row(scores.data(), n, top);
      float* o = out + item * kv_rank;
      std::fill(o, o + kv_rank, 0.0f);
      for (int64_t t = 0; t < n; ++t) {
        const float* c = latents.at(row, block_size, t);
        const float p = scores[t];
#pragma omp simd
        for (int64_t i = 0; i < kv_rank; ++i) o[i] += p * c[i];
      }
      const float inv = 1.0f / total;
      for (int64_t i = 0; i < kv_rank; ++i) o[i] *= inv;
    }
  });
}

}  // namespace latent_attention

// The arithmetic of one decode-attention tile (decode_attention.cpp): the query group's
// scores against a tile of key rows, base-2 exponentials, and the probability-weighted sum
// of the value rows. Scores are stored query-major, `stride` apart: scores[q * stride + i]
// for key i of the tile.
#pragma once

#include "fast_exp.h"
#include "vec.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace decode_blocks {

// A tile's K or V rows, row i at rows[i]. Gathered: through a table of row pointers, `step`
// apart (rows widened to acc_t, gathered from blocks of under 16 tokens, or wide tokens read
// one key at a time in memory order). Strided: base + i * stride, no table (one KV head's
// rows in a block or a contiguous cache), so reading a row costs no load of its address.
template <typename T>
struct GatheredRows {
  const T* const* table;
  int64_t step;
  const T* operator[](int64_t i) const { return table[i * step]; }
};
template <typename T>
struct StridedRows {
  const T* base;
  int64_t stride;
  const T* operator[](int64_t i) const { return base + i * stride; }
};

// exp2(s[i] - m) in place for a tile's scores; returns their sum.
inline float exp2_tile(float* s, int64_t n, float m) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    s[i] = exp2_nonpositive(s[i] - m);
    sum += s[i];
  }
  return sum;
}
inline double exp2_tile(double* s, int64_t n, double m) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp2(s[i] - m);
    sum += s[i];
  }
  return sum;
}

// scores[qb * stride] = q[qb] . k for a block of QB queries (rows of q, `dim` apart) and one
// key; two accumulators per query keep 2 * QB independent chains in flight. Any acc_t, any
// dim: the general case, and the keys a 4-key tile leaves over.
template <int QB, typename acc_t>
inline void score_one_key(const acc_t* q, const acc_t* k, int64_t dim, acc_t* scores,
                          int64_t stride) {
  constexpr int64_t L = LANES<acc_t>;
  Vec<acc_t> part[QB][2] = {};
  int64_t d0 = 0;
  for (; d0 + 2 * L <= dim; d0 += 2 * L) {
    const Vec<acc_t> k0 = load(k + d0), k1 = load(k + d0 + L);
    for (int qb = 0; qb < QB; ++qb) {
      part[qb][0] += load(q + qb * dim + d0) * k0;
      part[qb][1] += load(q + qb * dim + d0 + L) * k1;
    }
  }
  if (d0 + L <= dim) {
    const Vec<acc_t> k0 = load(k + d0);
    for (int qb = 0; qb < QB; ++qb) part[qb][0] += load(q + qb * dim + d0) * k0;
    d0 += L;
  }
  for (int qb = 0; qb < QB; ++qb) {
    acc_t s = sum_lanes<acc_t>(part[qb][0] + part[qb][1]);
    for (int64_t d = d0; d < dim; ++d) s += q[qb * dim + d] * k[d];
    scores[qb * stride] = s;
  }
}

// The lane sums of 8 float vectors as one 8-lane vector (lane j: the sum of v[j]), by a
// transposing tree: 16-lane vectors' halves added first, then pairs of vectors merged at
// each level so every shuffle and add serves two sums. ~5 narrow operations per sum, against
// ~8 full-width ones (cross-lane 512-bit shuffles, slow on Zen 4) for sum_lanes on each.
inline Float8 lane_sums8(const Vec<float> (&v)[8]) {
  Float8 y[8], c[4], e[2];
  for (int j = 0; j < 8; ++j) y[j] = fold_to_8_lanes(v[j]);
  // c[j]: y[2j]'s four partial sums, then y[2j+1]'s.
  for (int j = 0; j < 4; ++j) {
    c[j] = __builtin_shufflevector(y[2 * j], y[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(y[2 * j], y[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  // Adjacent lanes added within each 128-bit half (hadd): e[k] holds two partial sums each
  // of vectors 4k, 4k+2, 4k+1, 4k+3, in that order.
  for (int k = 0; k < 2; ++k) {
    e[k] = __builtin_shufflevector(c[2 * k], c[2 * k + 1], 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(c[2 * k], c[2 * k + 1], 1, 3, 9, 11, 5, 7, 13, 15);
  }
  // Once more: whole sums of vectors 0, 2, 4, 6, 1, 3, 5, 7; then put them in order.
  const Float8 g = __builtin_shufflevector(e[0], e[1], 0, 2, 8, 10, 4, 6, 12, 14) +
                   __builtin_shufflevector(e[0], e[1], 1, 3, 9, 11, 5, 7, 13, 15);
  return __builtin_shufflevector(g, g, 0, 4, 1, 5, 2, 6, 3, 7);
}

// scores[qb * stride + j] = q[qb] . k[j] for QB queries (1, 2 or 4) and 4 keys, float32:
// QB x 4 accumulators, so each step loads QB + 4 vectors for 4 * QB FMAs (one key at a
// time loads QB + 1 for QB), and the transposing tree sums their lanes 8 at a time.
template <int QB>
inline void score_four_keys(const float* q, const float* const* k, int64_t dim, float* scores,
                            int64_t stride) {
  static_assert(QB == 1 || QB == 2 || QB == 4);
  constexpr int64_t L = LANES<float>;
  constexpr int SETS = QB == 4 ? 2 : 1;
  Vec<float> acc[SETS][8] = {};  // (query qb, key j) at [qb / 2][(qb % 2) * 4 + j]
  const int64_t vec_end = dim - dim % L;
  for (int64_t d0 = 0; d0 < vec_end; d0 += L) {
    Vec<float> kv[4];
    for (int j = 0; j < 4; ++j) kv[j] = load(k[j] + d0);
    for (int qb = 0; qb < QB; ++qb) {
      const Vec<float> qv = load(q + qb * dim + d0);
      for (int j = 0; j < 4; ++j) acc[qb / 2][(qb % 2) * 4 + j] += qv * kv[j];
    }
  }
  for (int set = 0; set < SETS; ++set) {
    const Float8 sums = lane_sums8(acc[set]);
    float s[8];
    __builtin_memcpy(s, &sums, sizeof(s));
    for (int half = 0; half < 2 && 2 * set + half < QB; ++half) {
      const int qb = 2 * set + half;
      float* row = s + 4 * half;
      for (int64_t d = vec_end; d < dim; ++d) {  // dims past the last whole vector
        for (int j = 0; j < 4; ++j) row[j] += q[qb * dim + d] * k[j][d];
      }
      __builtin_memcpy(scores + qb * stride, row, 4 * sizeof(float));
    }
  }
}

// out[qb] += sum_i p[qb * stride + i] * rows[i] over dims [d0, d0 + W * L), for QB queries:
// QB x W accumulators held in registers across the tile's n rows, so each row loads W
// vectors and QB broadcasts for QB * W FMAs.
template <int QB, int W, typename acc_t, typename Rows>
inline void value_chunk(const acc_t* p, int64_t stride, Rows rows, int64_t n, int64_t v_dim,
                        int64_t d0, acc_t* out) {
  constexpr int64_t L = LANES<acc_t>;
  Vec<acc_t> a[QB][W];
  for (int qb = 0; qb < QB; ++qb) {
    for (int w = 0; w < W; ++w) a[qb][w] = load(out + qb * v_dim + d0 + w * L);
  }
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* v = rows[i] + d0;
    Vec<acc_t> vv[W];
    for (int w = 0; w < W; ++w) vv[w] = load(v + w * L);
    for (int qb = 0; qb < QB; ++qb) {
      const acc_t pi = p[qb * stride + i];
      for (int w = 0; w < W; ++w) a[qb][w] += pi * vv[w];
    }
  }
  for (int qb = 0; qb < QB; ++qb) {
    for (int w = 0; w < W; ++w) store<acc_t>(out + qb * v_dim + d0 + w * L, a[qb][w]);
  }
}

// out[qb] += sum_i p[qb * stride + i] * rows[i] for QB queries over all v_dim dims: chunks
// of 4 vectors (16 accumulators at QB = 4), then 2, then 1, then scalars.
template <int QB, typename acc_t, typename Rows>
inline void value_block(const acc_t* p, int64_t stride, Rows rows, int64_t n, int64_t v_dim,
                        acc_t* out) {
  constexpr int64_t L = LANES<acc_t>;
  int64_t d0 = 0;
  for (; d0 + 4 * L <= v_dim; d0 += 4 * L)
    value_chunk<QB, 4>(p, stride, rows, n, v_dim, d0, out);
  if (d0 + 2 * L <= v_dim) {
    value_chunk<QB, 2>(p, stride, rows, n, v_dim, d0, out);
    d0 += 2 * L;
  }
  if (d0 + L <= v_dim) {
    value_chunk<QB, 1>(p, stride, rows, n, v_dim, d0, out);
    d0 += L;
  }
  if (d0 == v_dim) return;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* v = rows[i];
    for (int qb = 0; qb < QB; ++qb) {
      const acc_t pi = p[qb * stride + i];
      for (int64_t d = d0; d < v_dim; ++d) out[qb * v_dim + d] += pi * v[d];
    }
  }
}

// Calls f(std::integral_constant<int, QB>, first_query) over a head's `group` queries in
// blocks of 4 (with 32 vector registers), then 2, then 1. A block's tiles are QB x 4
// accumulators for the scores and QB x 4 for the values, plus the rows they load: 4 queries
// need more than AVX2's 16 registers.
template <typename F>
inline void for_query_blocks(int64_t group, F&& f) {
  int64_t j = 0;
  if constexpr (VECTOR_REGISTERS >= 32) {
    for (; j + 4 <= group; j += 4) f(std::integral_constant<int, 4>{}, j);
  }
  for (; j + 2 <= group; j += 2) f(std::integral_constant<int, 2>{}, j);
  for (; j < group; ++j) f(std::integral_constant<int, 1>{}, j);
}

}  // namespace decode_blocks

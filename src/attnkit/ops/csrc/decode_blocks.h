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
#include <limits>
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

// The online softmax's steps on one query's row of a tile's scores, its first n entries.
// float works on whole vectors: the row must hold a multiple of the lanes (a tile row holds
// TILE), and the lanes past n are read and written but left out of the max and the sum.
// A tile's softmax (4 rows of 32) timed alone on a Zen 5 EPYC ran 2.3-2.6x as fast as with
// the scalar loops (omp simd, n unknown) and libm exp2 it replaced.

// Lane i true (all bits set) where first + i < n.
inline Vec<int32_t> lanes_before(int64_t first, int64_t n) {
  Vec<int32_t> at;
  for (int i = 0; i < LANES<int32_t>; ++i) at[i] = i;
  return at < static_cast<int32_t>(n - first);
}
inline float row_max(const float* s, int64_t n) {
  constexpr int64_t L = LANES<float>;
  const Vec<float> none = Vec<float>{} - std::numeric_limits<float>::infinity();
  Vec<float> top = none;
  for (int64_t i = 0; i < n; i += L) {
    const Vec<float> x = lanes_before(i, n) ? load(s + i) : none;
    top = top < x ? x : top;
  }
  return max_lanes<float>(top);
}
inline double row_max(const double* s, int64_t n) {
  double top = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) top = std::max(top, s[i]);
  return top;
}
// s[i] = exp2(s[i] - m) (m at least the row's max); returns their sum. The lanes past n
// are computed on whatever stale value they hold (possibly inf or NaN: with the default
// floating-point environment only flags are set) and left out of the sum; replacing them
// by m first measured 4% slower.
inline float exp2_row(float* s, int64_t n, float m) {
  constexpr int64_t L = LANES<float>;
  Vec<float> sum{};
  for (int64_t i = 0; i < n; i += L) {
    const Vec<float> e = exp2_nonpositive_of<Vec<float>, Vec<int32_t>>(load(s + i) - m);
    store<float>(s + i, e);
    sum += lanes_before(i, n) ? e : Vec<float>{};
  }
  return sum_lanes<float>(sum);
}
inline double exp2_row(double* s, int64_t n, double m) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp2(s[i] - m);
    sum += s[i];
  }
  return sum;
}
// exp2(x) for x <= 0: the running sum's rescaling factor (0 for x = -inf: the first tile;
// float gives 2^-126 below -126, where libm's exp2 gives less: as good as 0 beside 1).
inline float exp2_of_nonpositive(float x) {
  return x == -std::numeric_limits<float>::infinity() ? 0.0f : exp2_nonpositive(x);
}
inline double exp2_of_nonpositive(double x) { return std::exp2(x); }

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
inline Float8 lane_sums8(const Vec<float>* v) {  // v[0] ... v[7]
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

// The lane sums of 16 vectors of 16 float lanes as one vector, by a transposing tree like
// lane_sums8's, all at full width: 15 adds and 30 shuffles for the 16 sums, against 30 and
// 46 for lane_sums8 on two sets of 8. Lane 4c + p of the result is the sum of vector
// 4p + LANE_SUMS16_SLOT[c] (the order the tree leaves them in).
constexpr int LANE_SUMS16_SLOT[4] = {0, 2, 1, 3};
// (A template: an AVX2 build, with 8 lanes, must not compile it.)
template <typename V>
inline V lane_sums16(const V (&v)[16]) {
  static_assert(sizeof(V) == 16 * sizeof(float));
  V c[8], d[4], e[2];
  // c[p]: lanes 0-7 v[2p]'s halves added, lanes 8-15 v[2p+1]'s.
  for (int p = 0; p < 8; ++p) {
    c[p] = __builtin_shufflevector(v[2 * p], v[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 24, 25, 26,
                                   27, 28, 29, 30, 31) +
           __builtin_shufflevector(v[2 * p], v[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
                                   18, 19, 20, 21, 22, 23);
  }
  // d[r]: 128-bit chunks of 4 partial sums, of vectors 4r, 4r+2, 4r+1, 4r+3.
  for (int r = 0; r < 4; ++r) {
    d[r] = __builtin_shufflevector(c[2 * r], c[2 * r + 1], 0, 1, 2, 3, 20, 21, 22, 23, 8, 9, 10,
                                   11, 28, 29, 30, 31) +
           __builtin_shufflevector(c[2 * r], c[2 * r + 1], 4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14,
                                   15, 24, 25, 26, 27);
  }
  // e[s]: in each chunk, two partial sums of d[2s]'s vector there, then two of d[2s+1]'s.
  for (int s = 0; s < 2; ++s) {
    e[s] = __builtin_shufflevector(d[2 * s], d[2 * s + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24,
                                   25, 12, 13, 28, 29) +
           __builtin_shufflevector(d[2 * s], d[2 * s + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11,
                                   26, 27, 14, 15, 30, 31);
  }
  return __builtin_shufflevector(e[0], e[1], 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14,
                                 28, 30) +
         __builtin_shufflevector(e[0], e[1], 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, 13, 15,
                                 29, 31);
}

// scores[qb * stride + j] = q[qb] . k[j] for QB queries (1, 2 or 4) and 4 keys, float32:
// QB x 4 accumulators, so each step loads QB + 4 vectors for 4 * QB FMAs (one key at a
// time loads QB + 1 for QB), and a transposing tree sums their lanes: 16 at a time for 4
// queries in 16-lane vectors, else 8 at a time. The key and query vectors are loaded into
// registers once per step (load_to_register). With both, and the vector softmax above, the
// kernel read one KV head's K/V from L2/L3 1.10-1.21x as fast (Zen 5 EPYC, GQA 4 queries
// per KV head, builds timed in turn; 1.25-1.33x in an AVX2 build) and as fast from memory.
template <int QB>
inline void score_four_keys(const float* q, const float* const* k, int64_t dim, float* scores,
                            int64_t stride) {
  static_assert(QB == 1 || QB == 2 || QB == 4);
  constexpr int64_t L = LANES<float>;
  constexpr bool SUMS16 = QB == 4 && L == 16;
  // Where (query qb, key j)'s accumulator sits: so that the tree leaves its sum at lane
  // 4 * qb + j (of one vector for SUMS16, else of the set qb / 2's 8 sums).
  auto slot = [](int qb, int j) {
    if constexpr (SUMS16) return 4 * j + LANE_SUMS16_SLOT[qb];
    return (qb / 2) * 8 + (qb % 2) * 4 + j;
  };
  Vec<float> acc[QB == 4 ? 16 : 8] = {};
  const int64_t vec_end = dim - dim % L;
  for (int64_t d0 = 0; d0 < vec_end; d0 += L) {
    Vec<float> kv[4];
    for (int j = 0; j < 4; ++j) kv[j] = load_to_register(k[j] + d0);
    for (int qb = 0; qb < QB; ++qb) {
      const Vec<float> qv = load_to_register(q + qb * dim + d0);
      for (int j = 0; j < 4; ++j) acc[slot(qb, j)] += qv * kv[j];
    }
  }
  float sums[16];
  if constexpr (SUMS16) {
    const Vec<float> all = lane_sums16(acc);
    __builtin_memcpy(sums, &all, sizeof(all));
  } else {
    for (int set = 0; 2 * set < QB; ++set) {
      const Float8 eight = lane_sums8(acc + 8 * set);
      __builtin_memcpy(sums + 8 * set, &eight, sizeof(eight));
    }
  }
  for (int qb = 0; qb < QB; ++qb) {
    float* row = sums + 4 * qb;
    for (int64_t d = vec_end; d < dim; ++d) {  // dims past the last whole vector
      for (int j = 0; j < 4; ++j) row[j] += q[qb * dim + d] * k[j][d];
    }
    __builtin_memcpy(scores + qb * stride, row, 4 * sizeof(float));
  }
}

// score_four_keys for rows of exactly ROW_VECTORS vectors (d128 with AVX-512) and QB = 1
// or 2 queries, the 4 keys' rows read one after another, each whole: the queries' vectors
// sit in registers, one load per key vector feeds QB FMAs, and the 8 sums take lane_sums8.
// score_four_keys reads the 4 rows side by side a vector at a time, which the hardware's
// prefetchers follow less well: a loop of its loads alone, from memory, read at 0.74-0.88x
// of the speed of the same rows in order. With the whole-row value sums (value_block), the
// kernel read contiguous GQA 32/8 d128 1.04-1.10x as fast from memory (MHA 8/8 1.15x, MQA
// 8/1 1.04x; hot, 0.95-1.04x), Zen 5 EPYC, builds timed in turn.
constexpr int ROW_VECTORS = 8;
template <int QB>
inline void score_four_keys_in_row_order(const float* q, const float* const* k, float* scores,
                                         int64_t stride) {
  static_assert(QB == 1 || QB == 2);
  constexpr int64_t L = LANES<float>, DIM = ROW_VECTORS * L;
  Vec<float> qv[QB][ROW_VECTORS];
  for (int qb = 0; qb < QB; ++qb) {
    for (int c = 0; c < ROW_VECTORS; ++c) qv[qb][c] = load_to_register(q + qb * DIM + c * L);
  }
  Vec<float> acc[8] = {};  // (query qb, key j) at qb * 4 + j: its sum at lane qb * 4 + j
  for (int j = 0; j < 4; ++j) {
    for (int c = 0; c < ROW_VECTORS; ++c) {
      const Vec<float> kv = load_to_register(k[j] + c * L);
      for (int qb = 0; qb < QB; ++qb) acc[qb * 4 + j] += qv[qb][c] * kv;
    }
  }
  const Float8 eight = lane_sums8(acc);
  float sums[8];
  __builtin_memcpy(sums, &eight, sizeof(sums));
  for (int qb = 0; qb < QB; ++qb) {
    __builtin_memcpy(scores + qb * stride, sums + 4 * qb, 4 * sizeof(float));
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
// of 4 vectors (16 accumulators at QB = 4), then 2, then 1, then scalars. WHOLE_ROWS (QB of
// 1 or 2, 32 registers): chunks of 8 vectors first, so that rows of 8 vectors (d128 with
// AVX-512) are read in order, each whole, rather than in two passes of half rows (a loop
// of those loads alone read 0.77-0.81x as fast from memory).
template <int QB, typename acc_t, typename Rows, bool WHOLE_ROWS = false>
inline void value_block(const acc_t* p, int64_t stride, Rows rows, int64_t n, int64_t v_dim,
                        acc_t* out) {
  constexpr int64_t L = LANES<acc_t>;
  int64_t d0 = 0;
  if constexpr (WHOLE_ROWS) {
    static_assert(QB <= 2 && VECTOR_REGISTERS >= 32);
    for (; d0 + 8 * L <= v_dim; d0 += 8 * L) value_chunk<QB, 8>(p, stride, rows, n, v_dim, d0, out);
  }
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
[[gnu::always_inline]] inline void for_query_blocks(int64_t group, F&& f) {
  int64_t j = 0;
  if constexpr (VECTOR_REGISTERS >= 32) {
    for (; j + 4 <= group; j += 4) f(std::integral_constant<int, 4>{}, j);
  }
  for (; j + 2 <= group; j += 2) f(std::integral_constant<int, 2>{}, j);
  for (; j < group; ++j) f(std::integral_constant<int, 1>{}, j);
}

// Calls f(std::integral_constant<int, QB>, first_query, std::bool_constant<WHOLE>) over a
// head's `group` queries: where `in_row_order` (and ROW_ORDER allows it at compile time),
// in pairs with WHOLE true, for the row-order scores and values (rows read whole, in
// order); else in for_query_blocks' blocks with WHOLE false. Both are always inlined: left
// to GCC, the decode kernel ran 3-5% slower from L2 with this helper than with the same
// branches written out in place.
template <bool ROW_ORDER, typename F>
[[gnu::always_inline]] inline void for_query_blocks_in_order(int64_t group, bool in_row_order,
                                                             F&& f) {
  if constexpr (ROW_ORDER) {
    if (in_row_order) {
      int64_t j = 0;
      for (; j + 2 <= group; j += 2) f(std::integral_constant<int, 2>{}, j, std::true_type{});
      if (j < group) f(std::integral_constant<int, 1>{}, j, std::true_type{});
      return;
    }
  }
  for_query_blocks(group, [&](auto qb, int64_t j) { f(qb, j, std::false_type{}); });
}

}  // namespace decode_blocks

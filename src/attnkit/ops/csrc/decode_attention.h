#pragma once

// Fused CPU decode attention: one query token per sequence against its cached K/V, read once.
//
// K/V are addressed as [block][token_in_block][kv_head][dim] through explicit strides (dim
// contiguous), so one kernel serves a paged pool (a block table per sequence) and a
// contiguous cache (one block per sequence, no table). For each (sequence, KV head) the whole
// query group (heads / kv_heads query heads) is processed together, so every K and V row is
// streamed from memory once for all of them. Each work item walks a slice of the context a
// tile of tokens at a time (see TILE): scores for the tile, an
// online softmax (running max, running sum, rescaled accumulator) in float32 (float64 for
// float64 inputs), then the value rows. A work item takes one KV head, or every KV head of
// its tokens when their rows lie side by side (a paged pool: the item then streams whole
// blocks instead of touching one row per 4 KiB page). When there are too few items to keep
// every thread busy the context is split (FlashDecoding) and the slices' partial outputs
// merge by log-sum-exp. Work items are handed out dynamically, longest first, so ragged
// batches stay balanced. The next tile's rows are prefetched while the current one computes.
// Rows in float32 or float64 are read in place at their stride (attend_in_place): one KV head
// of a contiguous cache, or every KV head of a paged pool's tokens a block at a time. The
// others gather a tile's row addresses first (attend): rows widened on load (bfloat16,
// float16, int8), blocks of under 16 tokens, and wide tokens scored one key at a time in
// memory order.
//
// The tile's arithmetic (scores 4 keys at a time, exp2, the value sums) is in decode_blocks.h.
//
// Softmax runs in base 2: queries are pre-scaled by scale * log2(e), so p = exp2(s - m) and
// lse = (m + log2(l)) * ln(2).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "decode_blocks.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace decode_attention {

// Tokens whose scores are computed before their values are read. Read in place (attend_in_place):
// at most TILE, within one run of blocks that lie end to end (a paged pool's shuffled 16-token
// blocks make 16-token tiles). Gathered (attend): TILE for an item of one KV head, TILE / 2 for one
// of several (every KV head of a paged pool's tokens: 128 KiB of K/V a tile at 8 heads of d 128).
// 16 and 32 measured alike on a Xeon; on a Zen 5 EPYC 32 read one head's K/V 10-14% faster than 16
// (GQA 32/8 d128, batch 1-32, builds timed in turn), while a paged tile of 32 tokens of 8 heads
// gained nothing and 64 lost (its K/V outgrow the share of L2 they should use).
constexpr int64_t TILE = 32;
// Software prefetch of the rows AHEAD tiles on, spread over the current tile's score loop
// (attend; attend_in_place prefetches one tile ahead).
// On a 2-core AVX-512 Xeon this took one thread from ~6 to ~11 GB/s of K/V read from
// memory; prefetching all of a tile at once (a burst that stalls on the fill buffers) gave
// much less; 2 or 4 tiles ahead (with 8- to 32-token tiles) measured the same as 1.
constexpr int AHEAD = 1;
// An item of several KV heads scores 4 keys of one head at a time (QB x 4 accumulators: the
// fewest loads per FMA), which reads 4 tokens' rows side by side. Where its rows are not
// widened on load (measured in float32 only) and a token's K rows span this many bytes or
// more, it scores one key at a time in memory order instead (in attend). On a Zen 5 EPYC,
// paged pools of 16-token blocks, builds timed in turn: at 4 KiB a token (GQA 32/8 d128)
// memory order read 1.2-1.5x faster, as fast as a contiguous cache (a loop of the kernel's
// loads alone, no arithmetic, ran just as slowly in the 4-key order); at 2 KiB (MHA 8/8 d64)
// 1.1x; at 1 KiB (GQA 16/2 d128) 1.0-1.15x; at 768 bytes (SmolLM2's 9/3 d64) 5-9% slower.
constexpr int64_t MEMORY_ORDER_TOKEN_BYTES = 1024;
// The cache the prefetches fill. Into L2 on the Xeon: into L1 it read much slower. On AMD
// Zen into L1: on a Zen 5 EPYC that read contiguous K/V 3-10% faster from a slow memory and
// 17-24% faster from a fast one, paged pools 0-13% (GQA 32/8 d128, batch 1-32, builds timed
// in turn). Only -march=native (or znverN) on a Zen host names it; an x86-64-v3 or -v4 build
// there prefetches into L2.
#if defined(__znver1__) || defined(__znver2__) || defined(__znver3__) || defined(__znver4__) || \
    defined(__znver5__)
constexpr CacheLevel KV_PREFETCH = CacheLevel::L1;
#else
constexpr CacheLevel KV_PREFETCH = CacheLevel::L2;
#endif

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

struct Layout {
  int64_t batch, heads, kv_heads, group, dim, v_dim;
  int64_t block_size, num_blocks;
  int64_t k_block, k_token, k_head;  // strides in elements
  int64_t v_block, v_token, v_head;
  const int64_t* table;  // (batch, table_stride) block ids; null: sequence b is block b
  int64_t table_stride;
  bool has_table = false;  // a block_table was given (table is null when it has no columns)
  // int8 K/V: one float scale per row (block, token, KV head), the row's value / int8.
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  int64_t ks_block = 0, ks_token = 0, ks_head = 0;
  int64_t vs_block = 0, vs_token = 0, vs_head = 0;
  // A sliding window: each query sees its sequence's last `window` tokens and its first
  // `sinks` (the layer's sliding_window(window) | sinks(sinks)); window 0: every token.
  int64_t window = 0, sinks = 0;
};

// The tokens a sequence of n shows its query: [0, sink_end) and [window_start, n), every
// one of them once (without a window, or within one: sink_end = window_start = 0). Tokens
// in between are never read, so a paged cache may have given their blocks back.
struct SeenTokens {
  int64_t sink_end, window_start;
};
inline SeenTokens seen_tokens(const Layout& L, int64_t n) {
  if (L.window <= 0 || n <= L.window) return {0, 0};
  const int64_t window_start = n - L.window;
  const int64_t sink_end = std::min(L.sinks, window_start);
  return sink_end == window_start ? SeenTokens{0, 0} : SeenTokens{sink_end, window_start};
}

struct WorkItem {
  int64_t b, head, n_heads, start, end;  // KV heads [head, head + n_heads), tokens [start, end)
  int64_t part;  // -1: the item covers the whole sequence and writes the output directly
};

using namespace decode_blocks;

template <typename acc_t>
struct Scratch {
  std::vector<acc_t> scores, m, l, kbuf, vbuf;
  std::vector<const acc_t*> k_rows, v_rows;
};

// The online softmax's step for a tile: each of the nq queries' scores (`TILE` apart, n of
// them) become exp2(s - m) against the new running max m; what `out` (nq rows of dv) and the
// running sum l accumulated under the old max is rescaled.
template <typename acc_t>
void softmax_tile(acc_t* scores, int64_t n, int64_t nq, acc_t* m, acc_t* l, acc_t* out,
                  int64_t dv) {
  static_assert(TILE % LANES<float> == 0, "row_max and exp2_row read rows as whole vectors");
  for (int64_t r = 0; r < nq; ++r) {
    acc_t* sr = scores + r * TILE;
    const acc_t m_new = std::max(m[r], row_max(sr, n));
    if (m_new > m[r]) {
      const acc_t alpha = exp2_of_nonpositive(m[r] - m_new);
      l[r] *= alpha;
      acc_t* o = out + r * dv;
#pragma omp simd
      for (int64_t d = 0; d < dv; ++d) o[d] *= alpha;
      m[r] = m_new;
    }
    l[r] += exp2_row(sr, n, m_new);
  }
}

// The end of an item: outputs divided by their sums, base-2 lse (zeros and -inf for a query
// that saw no key).
template <typename acc_t>
void finish(int64_t nq, const acc_t* m, const acc_t* l, acc_t* out, int64_t dv, acc_t* lse2) {
  for (int64_t r = 0; r < nq; ++r) {
    acc_t* o = out + r * dv;
    if (l[r] > 0) {
      const acc_t inv = acc_t(1) / l[r];
#pragma omp simd
      for (int64_t d = 0; d < dv; ++d) o[d] *= inv;
      lse2[r] = m[r] + std::log2(l[r]);
    } else {
      lse2[r] = -std::numeric_limits<acc_t>::infinity();
    }
  }
}

// Whether an item is read in place (attend_in_place) rather than through gathered row
// pointers (attend). Its rows must be in acc_t already (float32 or float64, not widened on
// load): the caller checks that at compile time. Then: one KV head of a contiguous cache; or
// a paged pool's item of several KV heads with blocks of at least 16 tokens (tiles as long
// as attend's for several heads) and tokens under MEMORY_ORDER_TOKEN_BYTES (wider ones go
// one key at a time in memory order, in attend); or a paged item of one KV head with blocks
// of at least TILE tokens (MQA 8/1 d128 in 16-token blocks ran 0.90-0.95x as fast in place
// as gathered into 32-token tiles).
inline bool in_place_item(const Layout& L, const WorkItem& w, int64_t element_bytes) {
  if (L.table == nullptr) return w.n_heads == 1;
  if (w.n_heads == 1) return L.block_size >= TILE;
  return L.block_size >= 16 && L.k_token * element_bytes < MEMORY_ORDER_TOKEN_BYTES;
}

// attend() for an in_place_item, the same arithmetic in the same order. A tile is a run of at most
// TILE tokens within one block (a contiguous cache: one block per sequence) or within blocks that
// lie end to end, and in it each KV head's rows lie at the token stride, so they are read in place
// (StridedRows) rather than through tables of row pointers filled a tile at a time. On one head of
// a contiguous cache that bookkeeping (a pointer per row, a block-table walk, the prefetch loop's
// checks) took as many instructions as the FMAs. On SmolLM2-shaped paged pools (9/3 d64, 16-token
// blocks) reading in place ran 0-9% faster from memory and 8-13% faster from L2 than gathering (Zen
// 5 EPYC, builds timed in turn); contiguous caches as before.
template <typename acc_t>
void attend_in_place(const Layout& L, const acc_t* K, const acc_t* V, const acc_t* q,
                     const WorkItem& w, acc_t* out, acc_t* lse2, Scratch<acc_t>& S) {
  const int64_t G = L.group, D = L.dim, DV = L.v_dim, NH = w.n_heads, NQ = NH * G;
  // Rows of ROW_VECTORS float32 vectors with 32 registers are read in order, each whole
  // (score_four_keys_in_row_order, value_block's WHOLE_ROWS).
  constexpr bool ROW_ORDER = std::is_same_v<acc_t, float> && VECTOR_REGISTERS >= 32;
  const bool whole_rows = ROW_ORDER && D == ROW_VECTORS * LANES<float>;
  const bool whole_values = ROW_ORDER && DV == ROW_VECTORS * LANES<float>;
  S.scores.resize(NQ * TILE);
  S.m.assign(NQ, -std::numeric_limits<acc_t>::infinity());
  S.l.assign(NQ, acc_t(0));
  acc_t* scores = S.scores.data();
  std::fill(out, out + NQ * DV, acc_t(0));
  // A tile ends TILE tokens on, or at the end of the item or of t0's run of blocks: blocks
  // whose ids follow each other in the table and that lie end to end in the pool (a
  // sequence's blocks handed out together, as a prompt's are from a fresh pool) keep their
  // rows at one stride, so a tile reads across them as across one block. On SmolLM2-shaped
  // pools of 16-token blocks in order that took 16-token tiles to 32: 1.09x as fast from
  // memory (Zen 5 EPYC, builds timed in turn). The online softmax then steps by other
  // tiles, so a float32 answer may differ in its last bits with where the blocks lie.
  const bool blocks_end_to_end = L.table != nullptr && L.k_block == L.block_size * L.k_token &&
                                 L.v_block == L.block_size * L.v_token;
  const int64_t* table_row = L.table ? L.table + w.b * L.table_stride : nullptr;
  auto tile_end = [&](int64_t t0) {
    const int64_t last = std::min(t0 + TILE, w.end);
    int64_t j = t0 / L.block_size;  // the run's last block so far
    if (blocks_end_to_end) {
      while ((j + 1) * L.block_size < last && table_row[j + 1] == table_row[j] + 1) ++j;
    }
    return std::min(last, (j + 1) * L.block_size);
  };
  auto block = [&](int64_t t) {  // the block holding token t
    return L.table ? L.table[w.b * L.table_stride + t / L.block_size] : w.b;
  };
  auto k_token = [&](int64_t t) {  // token t's first K row (KV head w.head)
    return K + block(t) * L.k_block + (t % L.block_size) * L.k_token + w.head * L.k_head;
  };
  auto v_token = [&](int64_t t) {
    return V + block(t) * L.v_block + (t % L.block_size) * L.v_token + w.head * L.v_head;
  };
  // The first tile at once, each token's rows of every head as one span (the heads lie side
  // by side): no arithmetic runs before it to spread the prefetches over, as the later tiles'
  // are (below).
  const int64_t k_span = (NH - 1) * L.k_head + D, v_span = (NH - 1) * L.v_head + DV;
  const int64_t first_end = w.start < w.end ? tile_end(w.start) : w.start;
  for (int64_t t = w.start; t < first_end; ++t) {
    prefetch_row<KV_PREFETCH>(k_token(t), k_span);
    prefetch_row<KV_PREFETCH>(v_token(t), v_span);
  }
  int64_t t1 = 0;
  for (int64_t t0 = w.start; t0 < w.end; t0 = t1) {
    t1 = tile_end(t0);
    const int64_t n = t1 - t0;
    const int64_t n_next = t1 < w.end ? tile_end(t1) - t1 : 0;
    const acc_t* kb = k_token(t0);
    const acc_t* vb = v_token(t0);
    // Scores: float32 takes 4 keys of one head at a time, token group by token group (the
    // order of attend). The next tile's rows are prefetched a (token, head) row of K and of
    // V per row scored, in memory order; what is left (a tile after a short one: a block's
    // or an item's ragged start) goes after the scores. All of a token's rows at once, 24
    // lines at SmolLM2's 9/3 d64, stalled on the fill buffers: 0.7x as fast from memory.
    int64_t pf_token = 0, pf_head = 0;
    const acc_t* pf_k = n_next > 0 ? k_token(t1) : nullptr;
    const acc_t* pf_v = n_next > 0 ? v_token(t1) : nullptr;
    auto prefetch_next = [&] {
      if (pf_token < n_next) {
        prefetch_row<KV_PREFETCH>(pf_k + pf_token * L.k_token + pf_head * L.k_head, D);
        prefetch_row<KV_PREFETCH>(pf_v + pf_token * L.v_token + pf_head * L.v_head, DV);
        if (++pf_head == NH) {
          pf_head = 0;
          ++pf_token;
        }
      }
    };
    int64_t i = 0;
    if constexpr (std::is_same_v<acc_t, float>) {
      for (; i + 4 <= n; i += 4) {
        for (int64_t h = 0; h < NH; ++h) {
          for (int j = 0; j < 4; ++j) prefetch_next();
          const StridedRows<acc_t> k{kb + h * L.k_head, L.k_token};
          const float* k4[4] = {k[i], k[i + 1], k[i + 2], k[i + 3]};
          for_query_blocks_in_order<ROW_ORDER>(G, whole_rows, [&](auto qb, int64_t j, auto whole) {
            constexpr int QB = decltype(qb)::value;
            const int64_t row = h * G + j;
            if constexpr (decltype(whole)::value) {
              score_four_keys_in_row_order<QB>(q + row * D, k4, scores + row * TILE + i, TILE);
            } else {
              score_four_keys<QB>(q + row * D, k4, D, scores + row * TILE + i, TILE);
            }
          });
        }
      }
    }
    for (; i < n; ++i) {
      for (int64_t h = 0; h < NH; ++h) {
        prefetch_next();
        const acc_t* k = kb + h * L.k_head + i * L.k_token;
        for_query_blocks(G, [&](auto qb, int64_t j) {
          constexpr int QB = decltype(qb)::value;
          const int64_t row = h * G + j;
          score_one_key<QB, acc_t>(q + row * D, k, D, scores + row * TILE + i, TILE);
        });
      }
    }
    while (pf_token < n_next) prefetch_next();
    softmax_tile(scores, n, NQ, S.m.data(), S.l.data(), out, DV);
    // Values: each V row read once for its whole query group (from memory by the first
    // query block; rows of 8 vectors whole, by pairs of queries).
    for (int64_t h = 0; h < NH; ++h) {
      const StridedRows<acc_t> v{vb + h * L.v_head, L.v_token};
      for_query_blocks_in_order<ROW_ORDER>(G, whole_values, [&](auto qb, int64_t j, auto whole) {
        constexpr int QB = decltype(qb)::value;
        const int64_t row = h * G + j;
        value_block<QB, acc_t, StridedRows<acc_t>, decltype(whole)::value>(
            scores + row * TILE, TILE, v, n, DV, out + row * DV);
      });
    }
  }
  finish(NQ, S.m.data(), S.l.data(), out, DV, lse2);
}

// Online-softmax attention of the query groups of KV heads [w.head, w.head + w.n_heads) of
// sequence w.b over its tokens [w.start, w.end). q: those heads' queries (n_heads * group,
// dim), pre-scaled. Writes their normalised outputs (n_heads * group, v_dim) and base-2 lse.
template <typename scalar_t, typename acc_t>
void attend(const Layout& L, const scalar_t* K, const scalar_t* V, const acc_t* q,
            const WorkItem& w, acc_t* out, acc_t* lse2, Scratch<acc_t>& S) {
  const int64_t G = L.group, D = L.dim, DV = L.v_dim, NH = w.n_heads, NQ = NH * G;
  const int64_t tile_tokens = NH == 1 ? TILE : TILE / 2;
  S.scores.resize(NQ * TILE);
  S.m.assign(NQ, -std::numeric_limits<acc_t>::infinity());
  S.l.assign(NQ, acc_t(0));
  S.k_rows.resize(TILE * NH);
  S.v_rows.resize(TILE * NH);
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  constexpr bool quantized = std::is_same_v<scalar_t, int8_t>;
  const bool in_memory_order = !convert && NH > 1 &&
                               L.k_token * static_cast<int64_t>(sizeof(scalar_t)) >=
                                   MEMORY_ORDER_TOKEN_BYTES;
  if (convert) {
    S.kbuf.resize(TILE * NH * D);
    S.vbuf.resize(TILE * NH * DV);
  }
  acc_t* scores = S.scores.data();  // (NQ, TILE)
  acc_t* m = S.m.data();            // running max (base 2), per query
  acc_t* l = S.l.data();            // running sum of exp2(s - m)
  std::fill(out, out + NQ * DV, acc_t(0));

  // Token base pointers (KV head w.head) of the current tile and the AHEAD tiles after it,
  // in a ring; the block table is walked without a division per token.
  constexpr int RING = AHEAD + 1;
  const scalar_t* k_tok[RING][TILE];
  const scalar_t* v_tok[RING][TILE];
  const float* ks_tok[RING][TILE];  // int8: the rows' scales
  const float* vs_tok[RING][TILE];
  int64_t count[RING] = {};
  if (w.start >= w.end) {  // nothing to attend to (block_size may even be 0)
    std::fill(lse2, lse2 + NQ, -std::numeric_limits<acc_t>::infinity());
    return;
  }
  int64_t block_index = w.start / L.block_size;
  int64_t offset = w.start - block_index * L.block_size;
  int64_t located = w.start;  // tokens before this one have pointers
  auto locate_next = [&](int slot) {
    const int64_t n = std::min(tile_tokens, w.end - located);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t block = L.table ? L.table[w.b * L.table_stride + block_index] : w.b;
      k_tok[slot][i] = K + block * L.k_block + offset * L.k_token + w.head * L.k_head;
      v_tok[slot][i] = V + block * L.v_block + offset * L.v_token + w.head * L.v_head;
      if constexpr (quantized) {
        ks_tok[slot][i] = L.k_scale + block * L.ks_block + offset * L.ks_token + w.head * L.ks_head;
        vs_tok[slot][i] = L.v_scale + block * L.vs_block + offset * L.vs_token + w.head * L.vs_head;
      }
      if (++offset == L.block_size) {
        offset = 0;
        ++block_index;
      }
    }
    located += std::max<int64_t>(n, 0);
    count[slot] = std::max<int64_t>(n, 0);
  };
  for (int j = 0; j < AHEAD; ++j) locate_next(j);
  int64_t tile = 0;
  for (int64_t t0 = w.start; t0 < w.end; t0 += tile_tokens, ++tile) {
    const int slot = static_cast<int>(tile % RING);
    const int ahead = static_cast<int>((tile + AHEAD) % RING);
    locate_next(ahead);  // prefetched during this tile's scores
    const int64_t n = std::min(tile_tokens, w.end - t0);
    const int64_t n_next = count[ahead];
    // Rows of this tile, token-major: (i, h) at [i * NH + h]; half precision widened once.
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < NH; ++h) {
        const scalar_t* kr = k_tok[slot][i] + h * L.k_head;
        const scalar_t* vr = v_tok[slot][i] + h * L.v_head;
        if constexpr (convert) {
          acc_t* kb = S.kbuf.data() + (i * NH + h) * D;
          acc_t* vb = S.vbuf.data() + (i * NH + h) * DV;
          if constexpr (quantized) {
            const float ks = ks_tok[slot][i][h * L.ks_head], vs = vs_tok[slot][i][h * L.vs_head];
            for (int64_t d = 0; d < D; ++d) kb[d] = static_cast<float>(kr[d]) * ks;
            for (int64_t d = 0; d < DV; ++d) vb[d] = static_cast<float>(vr[d]) * vs;
          } else {
            for (int64_t d = 0; d < D; ++d) kb[d] = static_cast<acc_t>(kr[d]);
            for (int64_t d = 0; d < DV; ++d) vb[d] = static_cast<acc_t>(vr[d]);
          }
          S.k_rows[i * NH + h] = kb;
          S.v_rows[i * NH + h] = vb;
        } else {
          S.k_rows[i * NH + h] = kr;
          S.v_rows[i * NH + h] = vr;
        }
      }
    }
    // Scores: each K row read once for its whole query group. float32 takes 4 keys of a head
    // at a time, unless the item's tokens are wide (see MEMORY_ORDER_TOKEN_BYTES): then the
    // rows go one at a time in memory order.
    // The next tile's rows are prefetched a row per row scored (a tile is never shorter than
    // the one after it), in memory order: token, then KV head.
    int64_t pf_token = 0, pf_head = 0;
    auto prefetch_next = [&] {
      if (pf_token < n_next) {
        prefetch_row<KV_PREFETCH>(k_tok[ahead][pf_token] + pf_head * L.k_head, D);
        prefetch_row<KV_PREFETCH>(v_tok[ahead][pf_token] + pf_head * L.v_head, DV);
        if (++pf_head == NH) {
          pf_head = 0;
          ++pf_token;
        }
      }
    };
    int64_t i = 0;
    if constexpr (std::is_same_v<acc_t, float>) {
      for (; !in_memory_order && i + 4 <= n; i += 4) {
        for (int64_t h = 0; h < NH; ++h) {
          const float* k4[4];
          for (int j = 0; j < 4; ++j) {
            prefetch_next();
            k4[j] = S.k_rows[(i + j) * NH + h];
          }
          for_query_blocks(G, [&](auto qb, int64_t j) {
            constexpr int QB = decltype(qb)::value;
            const int64_t row = h * G + j;
            score_four_keys<QB>(q + row * D, k4, D, scores + row * TILE + i, TILE);
          });
        }
      }
    }
    for (; i < n; ++i) {
      for (int64_t h = 0; h < NH; ++h) {
        prefetch_next();
        const acc_t* k = S.k_rows[i * NH + h];
        for_query_blocks(G, [&](auto qb, int64_t j) {
          constexpr int QB = decltype(qb)::value;
          const int64_t row = h * G + j;
          score_one_key<QB, acc_t>(q + row * D, k, D, scores + row * TILE + i, TILE);
        });
      }
    }
    softmax_tile(scores, n, NQ, m, l, out, DV);
    // Values: each V row read once for its whole query group.
    for (int64_t h = 0; h < NH; ++h) {
      for_query_blocks(G, [&](auto qb, int64_t j) {
        constexpr int QB = decltype(qb)::value;
        const int64_t row = h * G + j;
        value_block<QB, acc_t>(scores + row * TILE, TILE,
                               GatheredRows<acc_t>{S.v_rows.data() + h, NH}, n, DV,
                               out + row * DV);
      });
    }
  }
  finish(NQ, m, l, out, DV, lse2);
}

// Lengths and the block ids in use within range; the same messages as the Python checks.
inline void check_values(const Layout& L, const int64_t* lengths) {
  if (L.batch == 0) return;
  const int64_t capacity = L.has_table ? L.table_stride * L.block_size : L.block_size;
  int64_t low = lengths[0], high = lengths[0];
  for (int64_t b = 1; b < L.batch; ++b) {
    low = std::min(low, lengths[b]);
    high = std::max(high, lengths[b]);
  }
  if (low < 0 || high > capacity) {
    if (L.has_table) {
      TORCH_CHECK_VALUE(false, "lengths must lie in [0, max_blocks * block_size = ", capacity,
                        "], got [", low, ", ", high, "]");
    }
    TORCH_CHECK_VALUE(false, "lengths must lie in [0, n = ", capacity, "], got [", low, ", ",
                      high, "]");
  }
  if (!L.table || L.block_size == 0) return;  // blocks of 0 tokens: every length is 0
  int64_t first = std::numeric_limits<int64_t>::max(), last = -1;
  auto check_blocks = [&](int64_t b, int64_t begin, int64_t end) {  // tokens [begin, end)
    for (int64_t j = begin / L.block_size; j * L.block_size < end; ++j) {
      const int64_t id = L.table[b * L.table_stride + j];
      first = std::min(first, id);
      last = std::max(last, id);
    }
  };
  for (int64_t b = 0; b < L.batch; ++b) {
    const SeenTokens seen = seen_tokens(L, lengths[b]);
    check_blocks(b, 0, seen.sink_end);
    check_blocks(b, seen.window_start, lengths[b]);
  }
  TORCH_CHECK_VALUE(last < 0 || (first >= 0 && last < L.num_blocks),
                    "block_table entries in use must lie in [0, ", L.num_blocks, "), got [",
                    first, ", ", last, "]");
}

// Work items: per sequence, its window's tokens (all of them without a window) in
// `num_splits` slices if given (> 0), else in enough to give every thread several items,
// none shorter than MIN_CHUNK tokens, and its sinks as one more slice; per slice, one item
// per KV head, or one for all KV heads when a token's head rows lie side by side (a paged
// pool): then an item streams whole blocks instead of one row per page.
inline std::vector<WorkItem> plan(const Layout& L, const int64_t* lengths, int64_t num_splits,
                                  std::vector<int64_t>& splits_of, int64_t* num_parts) {
  constexpr int64_t MIN_CHUNK = 512;
  const int64_t threads = at::get_num_threads();
  const bool heads_together =
      L.k_head * L.kv_heads <= L.k_token && L.v_head * L.kv_heads <= L.v_token;
  const int64_t per_item_heads = heads_together ? L.kv_heads : 1;
  int64_t chunk = 0;  // tokens per slice when splitting automatically
  if (num_splits <= 0) {
    int64_t total = 0;
    for (int64_t b = 0; b < L.batch; ++b) {
      const SeenTokens seen = seen_tokens(L, lengths[b]);
      total += seen.sink_end + lengths[b] - seen.window_start;
    }
    const int64_t wanted_items = 4 * threads;  // several per thread: dynamic balance
    const int64_t heads_items = L.kv_heads / per_item_heads;
    const int64_t per_item = (total * heads_items + wanted_items - 1) / wanted_items;
    chunk = std::max(MIN_CHUNK, per_item);
  }
  std::vector<WorkItem> items;
  int64_t parts = 0;
  for (int64_t b = 0; b < L.batch; ++b) {
    const int64_t n = lengths[b];
    const SeenTokens seen = seen_tokens(L, n);
    const int64_t in_window = n - seen.window_start;
    int64_t splits = num_splits > 0 ? num_splits : (in_window + chunk - 1) / chunk;
    splits = std::max<int64_t>(1, std::min(splits, in_window));
    const int64_t slices = splits + (seen.sink_end > 0);
    splits_of[b] = slices;
    const int64_t per = splits > 1 ? (in_window + splits - 1) / splits : in_window;
    auto add = [&](int64_t start, int64_t end, int64_t slice) {
      for (int64_t h = 0; h < L.kv_heads; h += per_item_heads) {
        items.push_back({b, h, per_item_heads, start, end, slices > 1 ? parts + slice : -1});
      }
    };
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t start = std::min(n, seen.window_start + s * per);
      add(start, std::min(n, start + per), s);
    }
    if (seen.sink_end > 0) add(0, seen.sink_end, splits);
    if (slices > 1) parts += slices;
  }
  // Longest first: with dynamic hand-out this keeps the threads' loads even.
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) {
    return a.end - a.start > b.end - b.start;
  });
  *num_parts = parts;
  return items;
}

template <typename scalar_t>
void run(const Layout& L, const at::Tensor& q, const scalar_t* K, const scalar_t* V,
         const int64_t* lengths, double scale, int64_t num_splits, at::Tensor& out,
         at::Tensor& lse) {
  using acc_t = typename AccType<scalar_t>::type;
  // q and out: float32 beside int8 K/V, else K/V's own dtype.
  using io_t = std::conditional_t<std::is_same_v<scalar_t, int8_t>, float, scalar_t>;
  const int64_t H = L.heads, G = L.group, D = L.dim, DV = L.v_dim;
  int64_t num_parts = 0;
  std::vector<int64_t> splits_of(L.batch);
  const std::vector<WorkItem> items = plan(L, lengths, num_splits, splits_of, &num_parts);

  // Queries in acc_t, pre-scaled by scale * log2(e): (batch, heads, dim).
  const acc_t q_scale = static_cast<acc_t>(scale * 1.4426950408889634);
  std::vector<acc_t> qs(L.batch * H * D);
  const io_t* qp = q.data_ptr<io_t>();
  for (int64_t i = 0; i < L.batch * H * D; ++i) qs[i] = static_cast<acc_t>(qp[i]) * q_scale;

  // Outputs in acc_t. A split sequence's slices write partials (slot, heads, v_dim), merged
  // below; the slots of one sequence are consecutive.
  std::vector<acc_t> out_acc(L.batch * H * DV), lse_acc(L.batch * H);
  std::vector<acc_t> part_out(num_parts * H * DV), part_lse(num_parts * H);

  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_items), 1,
                   [&](int64_t, int64_t) {
                     Scratch<acc_t> scratch;
                     for (int64_t i = next++; i < n_items; i = next++) {
                       const WorkItem& w = items[i];
                       const int64_t row = w.head * G;  // first query head of the item
                       const bool whole = w.part < 0;
                       acc_t* o = whole ? out_acc.data() + (w.b * H + row) * DV
                                        : part_out.data() + (w.part * H + row) * DV;
                       acc_t* s = whole ? lse_acc.data() + w.b * H + row
                                        : part_lse.data() + w.part * H + row;
                       const acc_t* q_item = qs.data() + (w.b * H + row) * D;
                       if constexpr (std::is_same_v<scalar_t, acc_t>) {
                         if (in_place_item(L, w, sizeof(scalar_t))) {
                           attend_in_place<acc_t>(L, K, V, q_item, w, o, s, scratch);
                           continue;
                         }
                       }
                       attend<scalar_t, acc_t>(L, K, V, q_item, w, o, s, scratch);
                     }
                   });

  // Merge the slices of split sequences by their log-sum-exp.
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  int64_t base = 0;
  for (int64_t b = 0; b < L.batch; ++b) {
    const int64_t splits = splits_of[b];
    if (splits == 1) continue;
    for (int64_t r = 0; r < H; ++r) {
      acc_t* o = out_acc.data() + (b * H + r) * DV;
      acc_t top = neg_inf;
      for (int64_t s = 0; s < splits; ++s) top = std::max(top, part_lse[(base + s) * H + r]);
      if (top == neg_inf) {  // no slice saw a key
        lse_acc[b * H + r] = neg_inf;
        continue;
      }
      acc_t total = 0;
      for (int64_t s = 0; s < splits; ++s) {
        const acc_t wt = std::exp2(part_lse[(base + s) * H + r] - top);  // 0 for empty slices
        total += wt;
        const acc_t* po = part_out.data() + ((base + s) * H + r) * DV;
#pragma omp simd
        for (int64_t d = 0; d < DV; ++d) o[d] += wt * po[d];
      }
      const acc_t inv = acc_t(1) / total;
#pragma omp simd
      for (int64_t d = 0; d < DV; ++d) o[d] *= inv;
      lse_acc[b * H + r] = top + std::log2(total);
    }
    base += splits;
  }

  io_t* op = out.data_ptr<io_t>();
  for (int64_t i = 0; i < L.batch * H * DV; ++i) op[i] = static_cast<io_t>(out_acc[i]);
  const acc_t ln2 = static_cast<acc_t>(0.6931471805599453);
  if (lse.scalar_type() == at::kDouble) {
    double* lp = lse.data_ptr<double>();
    for (int64_t i = 0; i < L.batch * H; ++i) lp[i] = static_cast<double>(lse_acc[i] * ln2);
  } else {
    float* lp = lse.data_ptr<float>();
    for (int64_t i = 0; i < L.batch * H; ++i) lp[i] = static_cast<float>(lse_acc[i] * ln2);
  }
}

// An integer index tensor's values as int64: read in place where they already are (CPU,
// int64, contiguous), widened into `widened` where they are CPU int32 and contiguous, else
// converted by torch into `converted`. Tables and lengths come as int32 from most callers;
// torch's conversion of both cost 13-18 us of a paged call from cold caches (~1 us hot).
inline const int64_t* index_values(const at::Tensor& t, std::vector<int64_t>& widened,
                                   at::Tensor& converted) {
  if (t.device().is_cpu() && t.is_contiguous()) {
    if (t.scalar_type() == at::kLong) return t.data_ptr<int64_t>();
    if (t.scalar_type() == at::kInt) {
      const int32_t* values = t.data_ptr<int32_t>();
      widened.assign(values, values + t.numel());
      return widened.data();
    }
  }
  converted = t.to(at::kCPU, at::kLong).contiguous();
  return converted.data_ptr<int64_t>();
}

// q: (batch, heads, dim), or (batch, heads, 1, dim) as attention layers hold it. k/v: a
// paged pool's (num_blocks, block_size, kv_heads, dim / v_dim), or with `heads_before_tokens`
// a contiguous cache's (batch, kv_heads, n, dim / v_dim); any strides with the last dim
// contiguous, read in place (no transpose or copy: from Python each such tensor op costs a
// few microseconds, tens from cold caches). block_table: (batch, max_blocks) integer, or None
// for one block per sequence (num_blocks == batch). lengths: (batch,) integer, or None for
// block_size. int8 k/v (q float32) come with k_scale, v_scale, one float32 per row, their
// dims ordered as k's without the last; a row reads as its int8 values times its scale.
// Returns out (batch, heads[, 1], v_dim) in q's dtype and lse (batch, heads[, 1]), float64 for
// float64 inputs and float32 otherwise. Shapes are checked in Python; values are checked here
// always (a bad block id would read outside the pool).
inline std::vector<at::Tensor> decode(const at::Tensor& q_in, const at::Tensor& k,
                                      const at::Tensor& v,
                                      const c10::optional<at::Tensor>& block_table,
                                      const c10::optional<at::Tensor>& lengths_in, double scale,
                                      int64_t num_splits,
                                      const c10::optional<at::Tensor>& k_scale = c10::nullopt,
                                      const c10::optional<at::Tensor>& v_scale = c10::nullopt,
                                      bool heads_before_tokens = false, int64_t window = 0,
                                      int64_t sinks = 0) {
  const bool q_row_dim = q_in.dim() == 4;  // (batch, heads, 1, dim)
  TORCH_CHECK_VALUE((q_in.dim() == 3 || (q_row_dim && q_in.size(2) == 1)) && k.dim() == 4 &&
                        v.dim() == 4,
                    "decode_attention kernel: q must be (batch, heads[, 1], dim) and k, v 4-D");
  TORCH_CHECK_VALUE(q_in.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
                    "the cpp backend takes CPU tensors");
  const bool quantized = k.scalar_type() == at::kChar;
  if (quantized) {
    TORCH_CHECK_VALUE(v.scalar_type() == at::kChar && q_in.scalar_type() == at::kFloat,
                      "int8 k needs int8 v and a float32 q");
    TORCH_CHECK_VALUE(k_scale.has_value() && v_scale.has_value(),
                      "int8 k and v need k_scale and v_scale");
  } else {
    TORCH_CHECK_VALUE(k.scalar_type() == q_in.scalar_type() &&
                          v.scalar_type() == q_in.scalar_type(),
                      "q, k and v must share one dtype");
    TORCH_CHECK_VALUE(!k_scale.has_value() && !v_scale.has_value(),
                      "k_scale and v_scale go with int8 k and v only");
  }
  TORCH_CHECK_VALUE(k.stride(3) == 1 && v.stride(3) == 1,
                    "k and v must be contiguous in their last dim");
  TORCH_CHECK_VALUE(window >= 0 && sinks >= 0, "window and sinks must be >= 0 (window 0: "
                    "every token), got ", window, " and ", sinks);
  const at::Tensor q = q_in.contiguous();  // (batch, heads, dim) in memory either way
  const int64_t token_axis = heads_before_tokens ? 2 : 1, head_axis = 3 - token_axis;
  Layout L;
  L.batch = q.size(0);
  L.heads = q.size(1);
  L.dim = q.size(-1);
  L.num_blocks = k.size(0);
  L.block_size = k.size(token_axis);
  L.kv_heads = k.size(head_axis);
  L.v_dim = v.size(3);
  TORCH_CHECK_VALUE(k.size(3) == L.dim && v.size(0) == L.num_blocks &&
                        v.size(token_axis) == L.block_size && v.size(head_axis) == L.kv_heads,
                    "k and v must agree with q and with each other");
  TORCH_CHECK_VALUE(L.kv_heads > 0 && L.heads % L.kv_heads == 0,
                    "heads must be a multiple of kv_heads");
  L.group = L.heads / L.kv_heads;
  L.window = window;
  L.sinks = sinks;
  L.k_block = k.stride(0);
  L.k_token = k.stride(token_axis);
  L.k_head = k.stride(head_axis);
  L.v_block = v.stride(0);
  L.v_token = v.stride(token_axis);
  L.v_head = v.stride(head_axis);
  if (quantized) {
    for (const at::Tensor* t : {&*k_scale, &*v_scale}) {
      TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->dim() == 3 &&
                            t->size(0) == L.num_blocks && t->size(token_axis) == L.block_size &&
                            t->size(head_axis) == L.kv_heads,
                        "k_scale and v_scale must be float32 ",
                        heads_before_tokens ? "(batch, kv_heads, n)"
                                            : "(num_blocks, block_size, kv_heads)");
    }
    L.k_scale = k_scale->data_ptr<float>();
    L.v_scale = v_scale->data_ptr<float>();
    L.ks_block = k_scale->stride(0);
    L.ks_token = k_scale->stride(token_axis);
    L.ks_head = k_scale->stride(head_axis);
    L.vs_block = v_scale->stride(0);
    L.vs_token = v_scale->stride(token_axis);
    L.vs_head = v_scale->stride(head_axis);
  }

  std::vector<int64_t> table_values, length_values;
  at::Tensor table, lengths;  // converted copies, where torch converts
  if (block_table.has_value()) {
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == L.batch,
                      "block_table must be (batch, max_blocks)");
    L.has_table = true;
    // A table of no columns: every length must be 0 (capacity 0, checked below), so no
    // block is read and a null pointer is never followed.
    L.table = index_values(*block_table, table_values, table);
    L.table_stride = block_table->size(1);
  } else {
    TORCH_CHECK_VALUE(L.num_blocks == L.batch, "without a block_table k needs one block per "
                                               "sequence");
    L.has_table = false;
    L.table = nullptr;
    L.table_stride = 1;
  }
  const int64_t* lens;
  if (lengths_in.has_value()) {
    TORCH_CHECK_VALUE(lengths_in->dim() == 1 && lengths_in->size(0) == L.batch,
                      "lengths must be (batch,)");
    lens = index_values(*lengths_in, length_values, lengths);
  } else {  // each sequence fills its block
    length_values.assign(L.batch, L.block_size);
    lens = length_values.data();
  }
  check_values(L, lens);

  // Shaped as q is, with v's head dim: (batch, heads[, 1], v_dim) and (batch, heads[, 1]).
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = q_row_dim ? at::empty({L.batch, L.heads, 1, L.v_dim}, q.options())
                             : at::empty({L.batch, L.heads, L.v_dim}, q.options());
  at::Tensor lse = q_row_dim ? at::empty({L.batch, L.heads, 1}, q.options().dtype(lse_dtype))
                             : at::empty({L.batch, L.heads}, q.options().dtype(lse_dtype));
  if (L.batch == 0) return {out, lse};
  switch (k.scalar_type()) {  // int8 K/V beside a float32 q
    case at::kFloat:
      run<float>(L, q, k.data_ptr<float>(), v.data_ptr<float>(), lens, scale, num_splits, out,
                 lse);
      break;
    case at::kDouble:
      run<double>(L, q, k.data_ptr<double>(), v.data_ptr<double>(), lens, scale, num_splits,
                  out, lse);
      break;
    case at::kBFloat16:
      run<c10::BFloat16>(L, q, k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), lens,
                         scale, num_splits, out, lse);
      break;
    case at::kChar:
      run<int8_t>(L, q, k.data_ptr<int8_t>(), v.data_ptr<int8_t>(), lens, scale, num_splits, out,
                  lse);
      break;
    case at::kHalf:
      run<c10::Half>(L, q, k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>(), lens, scale,
                     num_splits, out, lse);
      break;
    default:
      TORCH_CHECK_VALUE(false, "the cpp backend takes float32, float64, bfloat16 or float16, "
                               "got ",
                        q.scalar_type());
  }
  return {out, lse};
}

}  // namespace decode_attention

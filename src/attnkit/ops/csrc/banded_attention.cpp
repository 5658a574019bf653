// Causal and sliding-window attention (optionally with attention sinks) for prefill on CPU.
//
// A window W lets query position p see keys p - W < j <= p, plus keys j < sinks (StreamingLLM);
// a causal mask is the window W = n_k. The kernel works on blocks of 32 query rows (16 on
// AVX2), one per lane of two vectors: a few consecutive positions times the G query heads
// sharing a KV head (GQA: 8 positions x 4 heads), so the block's keys are the W + positions
// - 1 from its first row's window start to its last row, plus the sinks before them; no mask
// tensor, no copy of K or V. Per block, all in registers and this thread's L1/L2 scratch:
//   1. the block's queries, scaled, are transposed to (d, rows): a query row per lane;
//   2. scores: for 12 keys at a time, s[j] = sum_i k[j][i] * qT[i] (a scalar of K broadcast
//      against two vectors of queries: 24 accumulators, FMA-bound, K read as stored), masked
//      by position as they are stored, the row max kept per lane;
//   3. exp(s - max) per lane: the softmax runs down the key axis, lane-wise, with no
//      horizontal sums and no masks (masked scores are -inf and come out exactly 0);
//   4. values: for 13 output columns at a time, o[c] += v[j][c] * p[j] over the keys (the
//      same shape of kernel, V read as stored); scaled by 1 / sum and transposed back to rows.
// Steps 2-4 run on 256 keys at a time with FlashAttention's online softmax (a running max
// and sum per lane; the output rescaled when the max grows), for 16 consecutive blocks
// together, so a chunk of K and V is read from memory once for 512 query rows.
// Measured on a 2-core Xeon (AVX-512; d 64): W 512 at N 16384, 8/2 heads: 0.93-0.97 of the
// ideal (torch SDPA's causal time x the share of (query, key) pairs the window keeps), where
// BLAS matmuls on (G·32 x d) tiles reached 0.74-0.78; causal: 1.14x torch SDPA's speed at
// N 16384, 1.2-2.6x for N 64-4096 (fewer instructions for the lane-wise softmax, no
// work on the diagonal tiles' upper halves beyond a block's own positions).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "vec.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// The kernels keep tiles of vector pairs in registers (vec.h: the machine's own width; with
// 64-byte vectors on AVX2, GCC 12 built each broadcast scalar on the stack: 5.3 s against
// 115 ms with native-width vectors, W 512, N 16k).
constexpr int KEYS_AT_ONCE = VECTOR_REGISTERS >= 32 ? 12 : 6;  // 24 of 32 / 12 of 16 registers
// AVX-512: 26 accumulators, so d_v = 64 goes in 5 pieces, not 6.
constexpr int COLUMNS_AT_ONCE = VECTOR_REGISTERS >= 32 ? 13 : 6;
using vfloat = Vec<float>;
using vint [[gnu::vector_size(REGISTER_BYTES)]] = int32_t;
constexpr int64_t WIDTH = LANES<float>;
constexpr int64_t ROWS = 2 * WIDTH;  // query rows per block, one per lane of two vectors
// Keys are taken KEY_CHUNK at a time (the chunk's scores, 32 KB with AVX-512, stay in L1
// between the three passes over them) by a GROUP of consecutive blocks together (the
// chunk's K and V stay in L2 for all of them; one block at a time, causal N = 16k read
// 17 GB of K/V and ran at 0.99x of torch SDPA's speed, 16 blocks 1.14x, 8 blocks 1.13x;
// chunks of 512 keys the same).
constexpr int64_t KEY_CHUNK = 256;
constexpr int64_t GROUP = 16;

// vec.h's store, which cannot deduce its element type from a vector argument
inline void store(float* p, vfloat v) { ::store<float>(p, v); }
inline vfloat splat(float x) { return vfloat{} + x; }
inline vint splat(int32_t x) { return vint{} + x; }

// 2^x for x <= 0: exactly 0 below -126 (masked scores are -inf; their weight must be 0,
// not fast_exp.h's 2^-126), NaN stays NaN. x = n + f with n = round(x), |f| <= 1/2; 2^f
// by Cephes' exp2f polynomial (~1 ulp), 2^n through the exponent bits of the rounding.
inline vfloat exp2_or_zero(vfloat x) {
  const auto dead = x < splat(-126.0f);
  constexpr float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat shifted = x + magic;
  const vfloat f = x - (shifted - magic);
  vfloat p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  vint bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;  // the low bits of `shifted` hold n + 2^22
  vfloat two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return dead ? vfloat{} : p * two_n;
}

// Which query lanes may see a key: the lanes' positions and the mask's two numbers.
struct Visibility {
  vint pos[2];
  int32_t window, sinks;
  int32_t first, last;  // the lanes' lowest and highest positions
  vint seen(int32_t key, int h) const {
    const vint sink = splat(key < sinks ? int32_t(-1) : int32_t(0));
    return (splat(key) <= pos[h]) & ((pos[h] - key < window) | sink);
  }
};

// Scores of the J keys k[0..J) (rows d apart, positions key0...) against the block's
// queries qT (d, ROWS): rows j of sT, -inf where a lane may not see the key (MASKED: keys
// some lane may not see); mx keeps each lane's max.
template <int J, bool MASKED>
inline void score_keys(const float* qT, const float* k, int64_t d, int64_t key0, float* sT,
                       const Visibility& vis, vfloat* mx) {
  vfloat acc[J][2] = {};
  for (int64_t i = 0; i < d; ++i) {
    const vfloat q0 = load(qT + i * ROWS), q1 = load(qT + i * ROWS + WIDTH);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      const float kv = k[j * d + i];
      acc[j][0] += kv * q0;
      acc[j][1] += kv * q1;
    }
  }
  // each lane's max in registers, two running maxima a half (through mx, each max waited
  // on the store before it: with the sums below, 5-6% of causal attention on a Zen 5)
  vfloat best[2][2] = {{mx[0], mx[0]}, {mx[1], mx[1]}};
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      vfloat s = acc[j][h];
      if constexpr (MASKED) s = vis.seen(int32_t(key0 + j), h) ? s : splat(NEG_INF);
      store(sT + j * ROWS + h * WIDTH, s);
      vfloat& m = best[h][j % 2];
      m = s > m ? s : m;
    }
  }
  for (int h = 0; h < 2; ++h) mx[h] = best[h][1] > best[h][0] ? best[h][1] : best[h][0];
}

// o[c] += sum over the n keys of v[j][c] · pT[j] for the C columns c0...: rows of oT (dv, ROWS).
template <int C>
inline void value_columns(const float* pT, const float* v, int64_t n, int64_t dv, int64_t c0,
                          float* oT) {
  vfloat acc[C][2];
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) {
    acc[c][0] = load(oT + (c0 + c) * ROWS);
    acc[c][1] = load(oT + (c0 + c) * ROWS + WIDTH);
  }
  for (int64_t j = 0; j < n; ++j) {
    const vfloat p0 = load(pT + j * ROWS), p1 = load(pT + j * ROWS + WIDTH);
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const float vv = v[j * dv + c0 + c];
      acc[c][0] += vv * p0;
      acc[c][1] += vv * p1;
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) {
    store(oT + (c0 + c) * ROWS, acc[c][0]);
    store(oT + (c0 + c) * ROWS + WIDTH, acc[c][1]);
  }
}

// Cuts [0, n) into ceil(n / MOST) nearly equal pieces and calls f(start, size) with the
// size as a compile-time constant (the kernels above need theirs to keep acc in registers).
template <int MOST, typename F>
inline void in_pieces(int64_t n, F&& f) {
  const int64_t count = (n + MOST - 1) / MOST;
  int64_t at = 0;
  for (int64_t piece = 0; piece < count; ++piece) {
    const int size = int((n - at) / (count - piece));
    [&]<int... I>(std::integer_sequence<int, I...>) {
      ((size == I + 1 ? (f(at, std::integral_constant<int, I + 1>{}), 0) : 0), ...);
    }(std::make_integer_sequence<int, MOST>{});
    at += size;
  }
}

// score_keys over keys [key0, key0 + n), masking only where some lane may not see a key:
// every lane sees [last - window + 1, first], the band's middle (a causal block's keys
// but its diagonal); the keys before it and the diagonal after it take the mask. The
// mask's 16 integer vector operations a key are 6% of the arithmetic and shared the FMA
// pipes on a Zen 4 EPYC: skipping them in the middle, 1.4% faster (causal 4k-16k, W 512).
void score_range(const float* qT, const float* k, int64_t d, int64_t key0, int64_t n,
                 float* sT, const Visibility& vis, vfloat* mx) {
  const int64_t end = key0 + n;
  const int64_t a = std::clamp<int64_t>(int64_t(vis.last) - vis.window + 1, key0, end);
  const int64_t b = std::clamp<int64_t>(int64_t(vis.first) + 1, a, end);
  auto keys = [&]<bool MASKED>(int64_t from, int64_t to, std::bool_constant<MASKED>) {
    in_pieces<KEYS_AT_ONCE>(to - from, [&](int64_t j, auto size) {
      score_keys<decltype(size)::value, MASKED>(qT, k + (from + j) * d, d, from + j,
                                                sT + (from - key0 + j) * ROWS, vis, mx);
    });
  };
  keys(key0, a, std::true_type{});
  keys(a, b, std::false_type{});
  keys(b, end, std::true_type{});
}

void value_range(const float* pT, const float* v, int64_t n, int64_t dv, float* oT) {
  in_pieces<COLUMNS_AT_ONCE>(dv, [&](int64_t c, auto size) {
    value_columns<decltype(size)::value>(pT, v, n, dv, c, oT);
  });
}

// Swaps the off-diagonal b x b blocks of the 2b x 2b block in rows (a, c) = (i, i + b):
// a's lanes x with bit b set take c's lane x - b, c's lanes x with bit b clear a's x + b.
template <int b, int... X>
inline void swap_blocks(vfloat& a, vfloat& c, std::integer_sequence<int, X...>) {
  const vfloat upper = __builtin_shufflevector(a, c, ((X & b) ? WIDTH + X - b : X)...);
  const vfloat lower = __builtin_shufflevector(a, c, ((X & b) ? WIDTH + X : X + b)...);
  a = upper;
  c = lower;
}

// Transposes the WIDTH x WIDTH matrix r (row i = r[i]) in place: block swaps for
// b = WIDTH / 2, ..., 1 (4 x 16 two-source shuffles where scalar moves took 2 x 256).
template <int b = WIDTH / 2>
inline void transpose(vfloat* r) {
#pragma GCC unroll 16
  for (int i = 0; i < WIDTH; ++i) {
    if (!(i & b)) swap_blocks<b>(r[i], r[i + b], std::make_integer_sequence<int, WIDTH>{});
  }
  if constexpr (b > 1) transpose<b / 2>(r);
}

// qT (d, ROWS) = scale · the rows src[lane] (d, each), transposed a square at a time.
void gather_queries(const float* const* src, int64_t d, float scale, float* qT) {
  int64_t x0 = 0;
  for (; x0 + WIDTH <= d; x0 += WIDTH) {
    for (int64_t half = 0; half < 2; ++half) {
      vfloat r[WIDTH];
      for (int64_t l = 0; l < WIDTH; ++l) r[l] = load(src[half * WIDTH + l] + x0) * scale;
      transpose(r);
      for (int64_t x = 0; x < WIDTH; ++x) store(qT + (x0 + x) * ROWS + half * WIDTH, r[x]);
    }
  }
  for (; x0 < d; ++x0) {
    for (int64_t lane = 0; lane < ROWS; ++lane) qT[x0 * ROWS + lane] = src[lane][x0] * scale;
  }
}

// The rows dst[lane], lane < used, (dv each) = oT's columns (dv, ROWS), transposed back.
void scatter_outputs(const float* oT, int64_t dv, int64_t used, float* const* dst) {
  int64_t c0 = 0;
  for (; c0 + WIDTH <= dv; c0 += WIDTH) {
    for (int64_t half = 0; half * WIDTH < used; ++half) {
      vfloat r[WIDTH];
      for (int64_t c = 0; c < WIDTH; ++c) r[c] = load(oT + (c0 + c) * ROWS + half * WIDTH);
      transpose(r);
      const int64_t lanes = std::min(WIDTH, used - half * WIDTH);
      for (int64_t l = 0; l < lanes; ++l) store(dst[half * WIDTH + l] + c0, r[l]);
    }
  }
  for (; c0 < dv; ++c0) {
    for (int64_t lane = 0; lane < used; ++lane) dst[lane][c0] = oT[c0 * ROWS + lane];
  }
}

// One block of query rows and its running (online) softmax. Its keys are [0, n_sink) and
// [lo, hi): the sinks before its band, then the band from its first row's window start to
// its last row. Keys no row of the block sees stay out of its arithmetic (a NaN there would
// reach the output through 0 · NaN in the product with V).
struct Block {
  float* dst[ROWS];
  int64_t used;  // lanes holding rows; spare lanes repeat the last row
  int64_t n_sink, lo, hi;
  Visibility vis;
  float* qT;  // (d, ROWS)
  float* oT;  // (dv, ROWS)
  vfloat mx[2], total[2];
};

// Calls f(first key, count) for the parts of keys [a, b) that `block` needs.
template <typename F>
inline void needed_parts(const Block& block, int64_t a, int64_t b, F&& f) {
  if (a >= b) return;
  if (a < block.n_sink) f(a, std::min(b, block.n_sink) - a);
  const int64_t from = std::max(a, block.lo), to = std::min(b, block.hi);
  if (from < to) f(from, to - from);
}

// The block's scores for its needed keys among [a1, b1) and [a2, b2), into sT; then the
// online softmax step: the running max, oT and the sum rescaled where it grew, and the
// weights' product with V added to oT.
void attend(Block& block, int64_t a1, int64_t b1, int64_t a2, int64_t b2, const float* kh,
            const float* vh, int64_t d, int64_t dv, float* sT) {
  const vfloat before[2] = {block.mx[0], block.mx[1]};
  int64_t n = 0;
  auto score = [&](int64_t key0, int64_t count) {
    score_range(block.qT, kh, d, key0, count, sT + n * ROWS, block.vis, block.mx);
    n += count;
  };
  needed_parts(block, a1, b1, score);
  needed_parts(block, a2, b2, score);
  if (n == 0) return;
  vfloat shift[2];
  for (int h = 0; h < 2; ++h) {
    // a lane that has seen no key yet: max -inf, its weights all 0 (not exp(-inf + inf))
    shift[h] = block.mx[h] == splat(NEG_INF) ? vfloat{} : block.mx[h];
    const vfloat alpha = exp2_or_zero(before[h] - shift[h]);
    block.total[h] *= alpha;
    for (int64_t c = 0; c < dv; ++c) {
      float* o = block.oT + c * ROWS + h * WIDTH;
      store(o, load(o) * alpha);
    }
  }
  // the sums in registers (through block.total each add waited on the store before it)
  vfloat total[2] = {block.total[0], block.total[1]};
  for (int64_t j = 0; j < n; ++j) {
    for (int h = 0; h < 2; ++h) {
      float* s = sT + j * ROWS + h * WIDTH;
      const vfloat e = exp2_or_zero(load(s) - shift[h]);
      store(s, e);
      total[h] += e;
    }
  }
  block.total[0] = total[0];
  block.total[1] = total[1];
  int64_t at = 0;
  auto add_values = [&](int64_t key0, int64_t count) {
    value_range(sT + at * ROWS, vh + key0 * dv, count, dv, block.oT);
    at += count;
  };
  needed_parts(block, a1, b1, add_values);
  needed_parts(block, a2, b2, add_values);
}

}  // namespace

// q (B, H, n_q, d), k (B, Hkv, n_k, d), v (B, Hkv, n_k, dv): float32, contiguous. Query row i
// sits at position p = q_offset + i (inside the keys, so it sees at least itself) and sees
// keys p - window < j <= p, plus keys j < sinks with j <= p. `scale` multiplies q·k. `tile`
// caps the query positions per block (fewer when G heads fill the ROWS lanes sooner).
// Returns (B, H, n_q, dv).
at::Tensor banded_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            int64_t window, int64_t sinks, int64_t q_offset, double scale,
                            int64_t tile) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->device().is_cpu(),
                "banded_attention takes contiguous 4-D float32 CPU tensors");
  }
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && v.size(1) == k.size(1) &&
                  v.size(2) == k.size(2) && k.size(3) == q.size(3) && k.size(1) > 0 &&
                  q.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "q (B, H, n_q, d), k (B, Hkv, n_k, d), v (B, Hkv, n_k, dv) with H > 0 and "
              "H % Hkv == 0");
  TORCH_CHECK(window >= 1 && sinks >= 0 && tile >= 1, "window >= 1, sinks >= 0, tile >= 1, got ",
              window, ", ", sinks, ", ", tile);
  TORCH_CHECK(q_offset >= 0 && q_offset <= k.size(2) - q.size(2),  // no int64 overflow
              "query rows must sit at key positions: 0 <= q_offset and q_offset + n_q <= n_k");
  TORCH_CHECK(k.size(2) < std::numeric_limits<int32_t>::max(),
              "banded_attention takes n_k < 2**31 keys (positions are int32 lanes), got ",
              k.size(2));
  const int64_t B = q.size(0), H = q.size(1), n_q = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), n_k = k.size(2), dv = v.size(3), G = H / Hkv;
  at::Tensor out = at::empty({B, H, n_q, dv}, q.options());
  // Past n_k a window or sink count changes nothing: clamped, so positions stay int32.
  window = std::min(window, n_k);
  sinks = std::min(sinks, n_k);
  // A block: `positions` query positions x `heads` of the group (G > ROWS: the group's heads
  // in several parts, each its own blocks); GROUP consecutive blocks share key chunks.
  const int64_t heads = std::min(G, ROWS);
  const int64_t head_parts = (G + heads - 1) / heads;
  const int64_t positions = std::max<int64_t>(1, std::min(tile, ROWS / heads));
  const int64_t n_blocks = (n_q + positions - 1) / positions;
  const int64_t n_groups = (n_blocks + GROUP - 1) / GROUP;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // scores in log2 units: exp(s) = 2^(s · log2 e) with the factor folded into the queries
  const float q_scale = float(scale * 1.4426950408889634);
  at::parallel_for(0, B * Hkv * head_parts * n_groups, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor scratch =
        at::empty({ROWS * (KEY_CHUNK + GROUP * (d + dv))}, q.options());
    float* const sT = scratch.data_ptr<float>();  // (keys, ROWS): scores, then weights
    Block blocks[GROUP];
    for (int64_t bi = 0; bi < GROUP; ++bi) {
      blocks[bi].qT = sT + ROWS * (KEY_CHUNK + bi * (d + dv));
      blocks[bi].oT = blocks[bi].qT + ROWS * d;
    }
    const float* src[ROWS];
    int32_t lane_pos[ROWS];
    for (int64_t item = begin; item < end; ++item) {
      // groups in zigzag order (0, last, 1, last - 1, ...): with a causal mask a block's
      // work grows with its position, and each thread takes a contiguous run of items
      const int64_t t = item % n_groups;
      const int64_t group = t % 2 == 0 ? t / 2 : n_groups - 1 - t / 2;
      const int64_t head_part = (item / n_groups) % head_parts;
      const int64_t hk = item / (n_groups * head_parts) % Hkv;
      const int64_t b = item / (n_groups * head_parts * Hkv);
      const int64_t g0 = head_part * heads, block_heads = std::min(heads, G - g0);
      const int64_t first = group * GROUP, count = std::min(GROUP, n_blocks - first);
      for (int64_t bi = 0; bi < count; ++bi) {
        Block& block = blocks[bi];
        const int64_t r0 = (first + bi) * positions, rows = std::min(positions, n_q - r0);
        block.used = rows * block_heads;
        for (int64_t lane = 0; lane < ROWS; ++lane) {
          const int64_t l = std::min(lane, block.used - 1);
          const int64_t i = l / block_heads, h = hk * G + g0 + l % block_heads;
          src[lane] = qp + ((b * H + h) * n_q + r0 + i) * d;
          block.dst[lane] = op + ((b * H + h) * n_q + r0 + i) * dv;
          lane_pos[lane] = int32_t(q_offset + r0 + i);
        }
        gather_queries(src, d, q_scale, block.qT);
        // lanes are in position order; spare ones repeat the last row
        block.vis = Visibility{{}, int32_t(window), int32_t(sinks), lane_pos[0],
                               lane_pos[ROWS - 1]};
        std::memcpy(block.vis.pos, lane_pos, sizeof(block.vis.pos));
        const int64_t p0 = q_offset + r0;
        block.lo = std::max<int64_t>(0, p0 - window + 1);
        block.hi = p0 + rows;
        block.n_sink = std::min(sinks, block.lo);
        block.mx[0] = block.mx[1] = splat(NEG_INF);
        block.total[0] = block.total[1] = vfloat{};
        std::fill(block.oT, block.oT + ROWS * dv, 0.0f);
      }
      // the group's keys, [0, n_sink) then [lo, hi) for its blocks together, KEY_CHUNK at a
      // time: each chunk of K and V (in L2) serves every block of the group before the
      // next. A later block's window starts later, so it may have more sinks than the
      // group's n_sink: needed_parts finds those in the band part of the list.
      const int64_t lo = blocks[0].lo, hi = blocks[count - 1].hi;
      const int64_t n_sink = std::min(sinks, lo), n_keys = n_sink + hi - lo;
      const float* kh = kp + (b * Hkv + hk) * n_k * d;
      const float* vh = vp + (b * Hkv + hk) * n_k * dv;
      for (int64_t c0 = 0; c0 < n_keys; c0 += KEY_CHUNK) {
        const int64_t c1 = std::min(n_keys, c0 + KEY_CHUNK);
        // list positions [c0, c1) as keys: a part among the sinks, a part of the band
        const int64_t a1 = std::min(c0, n_sink), b1 = std::min(c1, n_sink);
        const int64_t a2 = lo + std::max(c0, n_sink) - n_sink, b2 = lo + c1 - n_sink;
        for (int64_t bi = 0; bi < count; ++bi) {
          attend(blocks[bi], a1, b1, a2, b2, kh, vh, d, dv, sT);
        }
      }
      for (int64_t bi = 0; bi < count; ++bi) {
        Block& block = blocks[bi];
        const vfloat inv_total[2] = {1.0f / block.total[0], 1.0f / block.total[1]};
        for (int64_t c = 0; c < dv; ++c) {
          for (int h = 0; h < 2; ++h) {
            float* o = block.oT + c * ROWS + h * WIDTH;
            store(o, load(o) * inv_total[h]);
          }
        }
        scatter_outputs(block.oT, dv, block.used, block.dst);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("BLOCK_ROWS") = ROWS;  // query rows per block: 32 with AVX-512, 16 with AVX2
  m.def("banded_attention", &banded_attention,
        "causal or sliding-window (+ sinks) attention, float32");
}

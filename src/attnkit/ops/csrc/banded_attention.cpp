// Sliding-window attention (optionally with attention sinks) for prefill on CPU.
//
// A window W lets query position p see keys p - W < j <= p, plus keys j < sinks (StreamingLLM).
// Cutting the queries into tiles of `tile` rows, each tile needs only the band of keys from
// its first row's window start to its last row: W + tile - 1 keys (its start rounded down
// to a whole vector where no unseen key enters), not the N of a dense mask. Per (sequence, KV head, query tile) this kernel
//   1. folds the tile's rows of the G query heads that share the KV head into one
//      (G·tile, d) matrix (GQA: K and V read once per group),
//   2. multiplies it by the band's keys with torch's matmul (one BLAS call), and by the
//      few sink keys before the band with dot products,
//   3. per row, a max pass and an exp-and-sum pass over whole vectors, masking the band keys
//      that row must not see to 0,
//   4. multiplies by the band's values (BLAS), adds the sinks' and scales each row by
//      1 / sum as it is written out.
// The whole band fits one pass, so no online-softmax rescaling is needed. Measured on a
// 2-core Xeon (8/2 heads, d 64, W 512, N 16384, tile 32): 1.26-1.3x torch SDPA's causal
// kernel time scaled to the share of (query, key) pairs the window keeps; the two BLAS
// calls are ~70% of it (MKL reaches ~260 GFLOP/s on these (128 x 64) x (64 x 544) and
// (128 x 544) x (544 x 64) products, ~330 on SDPA's (256 x 64) x (64 x 512)), the row
// passes ~17%. SDPA over each tile's keys with a mask took 1.8-2.1x (the mask is read per
// pair, small problems run less efficiently).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr int64_t WIDTH = LANES<float>;
using vfloat = Vec<float>;
using vint = Vec<int32_t>;

inline vfloat splat(float x) { return vfloat{} + x; }

// exp(x) for x <= 0 (scores minus their row max), Cephes' expf: x = n ln2 + r with
// |r| <= ln2 / 2, a degree-6 polynomial for exp(r), 2^n through the exponent bits.
inline vfloat exp_nonpositive(vfloat x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round
  const vfloat r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline int64_t round_up(int64_t n) { return (n + WIDTH - 1) / WIDTH * WIDTH; }

inline vint lane_index() {
  vint idx;
  for (int64_t i = 0; i < WIDTH; ++i) idx[i] = int32_t(i);
  return idx;
}

// One row of band scores s[0, band), padded with anything to whole vectors: the visible
// ones, [0, sink_end) and [first, last], become exp(s - max) (max and sum also over the
// row's scores of the sinks before the band, sk[0, n_sink), exponentiated in place), the
// others 0; sk is padded to whole vectors too. Returns 1 / sum. It works on whole vectors
// with lane masks: the row's edges fall anywhere, and scalar tails cost a libm exp a score.
float softmax_row(float* s, int64_t band, int64_t first, int64_t last, int64_t sink_end,
                  float* sk, int64_t n_sink) {
  const int64_t begin = sink_end > 0 ? 0 : first / WIDTH * WIDTH;
  const vint lanes = lane_index();
  const auto visible = [&](int64_t j) {
    const vint idx = lanes + int32_t(j);
    return ((idx >= int32_t(first)) & (idx <= int32_t(last))) | (idx < int32_t(sink_end));
  };
  const auto is_sink = [&](int64_t j) { return lanes + int32_t(j) < int32_t(n_sink); };
  vfloat mv = splat(NEG_INF);
  for (int64_t j = 0; j < n_sink; j += WIDTH) {
    const vfloat x = load(sk + j);
    mv = is_sink(j) & (x > mv) ? x : mv;
  }
  for (int64_t j = begin; j <= last; j += WIDTH) {
    const vfloat x = load(s + j);
    mv = visible(j) & (x > mv) ? x : mv;
  }
  float mx = NEG_INF;
  for (int64_t i = 0; i < WIDTH; ++i) mx = std::max(mx, mv[i]);  // once a row: plain loop
  vfloat acc{};
  for (int64_t j = 0; j < n_sink; j += WIDTH) {
    const vfloat e = exp_nonpositive(load(sk + j) - mx);
    const vfloat kept = is_sink(j) ? e : vfloat{};
    store<float>(sk + j, kept);
    acc += kept;
  }
  int64_t j = begin;
  for (; j <= last; j += WIDTH) {
    const vfloat e = exp_nonpositive(load(s + j) - mx);
    const vfloat kept = visible(j) ? e : vfloat{};
    store<float>(s + j, kept);
    acc += kept;
  }
  std::fill(s, s + begin, 0.0f);
  if (j < band) std::fill(s + j, s + band, 0.0f);  // j may pass band: fill needs j <= band
  return 1.0f / sum_lanes<float>(acc);
}

// (rows, cols) over data, rows `stride` floats apart (BLAS's leading dimension)
at::Tensor view_of(float* data, int64_t rows, int64_t cols, int64_t stride) {
  return at::from_blob(data, {rows, cols}, {stride, 1}, at::TensorOptions().dtype(at::kFloat));
}
at::Tensor view_of(float* data, int64_t rows, int64_t cols) {
  return view_of(data, rows, cols, cols);
}

// out[s] = q · k[s] for the n keys k[s] = k + s·d: four keys at a time, so that four lane
// sums (a chain of dependent shuffles each) overlap instead of running one after another.
void dots(const float* q, const float* k, int64_t n, int64_t d, float* out) {
  for (int64_t s0 = 0; s0 < n; s0 += 4) {
    const int64_t count = std::min<int64_t>(4, n - s0);
    vfloat acc[4] = {};
    int64_t i = 0;
    for (; i + WIDTH <= d; i += WIDTH) {
      const vfloat x = load(q + i);
      for (int64_t s = 0; s < count; ++s) acc[s] += x * load(k + (s0 + s) * d + i);
    }
    for (int64_t s = 0; s < count; ++s) {
      float total = sum_lanes<float>(acc[s]);
      for (int64_t j = i; j < d; ++j) total += q[j] * k[(s0 + s) * d + j];
      out[s0 + s] = total;
    }
  }
}

// dst = (o + sum over the sinks of weight[s] · v[s]) / total, v[s] = v + s·dv: one pass per
// output row, the sinks' values added where the band's product already sits in registers.
void write_row(const float* o, const float* weight, const float* v, int64_t n_sink, int64_t dv,
               float inv_total, float* dst) {
  int64_t c = 0;
  for (; c + WIDTH <= dv; c += WIDTH) {
    vfloat acc = load(o + c);
    for (int64_t s = 0; s < n_sink; ++s) acc += weight[s] * load(v + s * dv + c);
    store<float>(dst + c, acc * inv_total);
  }
  for (; c < dv; ++c) {
    float acc = o[c];
    for (int64_t s = 0; s < n_sink; ++s) acc += weight[s] * v[s * dv + c];
    dst[c] = acc * inv_total;
  }
}

}  // namespace

// q (B, H, n_q, d), k (B, Hkv, n_k, d), v (B, Hkv, n_k, dv): float32, contiguous. Query row i
// sits at position p = q_offset + i (inside the keys, so it sees at least itself) and sees
// keys p - window < j <= p, plus keys j < sinks with j <= p. `scale` multiplies q·k.
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
                  q.size(1) % k.size(1) == 0,
              "q (B, H, n_q, d), k (B, Hkv, n_k, d), v (B, Hkv, n_k, dv) with H % Hkv == 0");
  TORCH_CHECK(window >= 1 && sinks >= 0 && tile >= 1, "window >= 1, sinks >= 0, tile >= 1, got ",
              window, ", ", sinks, ", ", tile);
  TORCH_CHECK(q_offset >= 0 && q_offset + q.size(2) <= k.size(2),
              "query rows must sit at key positions: 0 <= q_offset and q_offset + n_q <= n_k");
  const int64_t B = q.size(0), H = q.size(1), n_q = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), n_k = k.size(2), dv = v.size(3), G = H / Hkv;
  at::Tensor out = at::empty({B, H, n_q, dv}, q.options());
  // Past n_k a window or sink count changes nothing (nor a tile past n_q): clamped, so the
  // scratch below is sized by the problem, not by an argument like sliding_window(2**63 - 1).
  window = std::min(window, n_k);
  sinks = std::min(sinks, n_k);
  tile = std::min(tile, std::max<int64_t>(n_q, 1));
  const int64_t n_tiles = (n_q + tile - 1) / tile;
  // score rows: a band of up to W + tile - 1 keys, plus up to WIDTH - 1 for its rounded-down
  // start, padded to whole vectors
  const int64_t max_ld = round_up(std::min(n_k, window + tile + WIDTH - 2));
  const int64_t first_seen = std::max<int64_t>(0, q_offset - window + 1);  // by any query
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = float(scale);
  at::parallel_for(0, B * Hkv * n_tiles, 1, [&](int64_t begin, int64_t end) {
    // this thread's scratch: folded queries, band and sink scores, folded outputs
    // (64-byte aligned: at::empty's allocator; a score row starting on a cache line lets
    // MKL and the row passes run 2-3% faster)
    const at::Tensor scratch = at::empty({G * tile * (d + max_ld + dv + round_up(sinks) + 1)},
                                         q.options());
    float* const sband = scratch.data_ptr<float>();         // (G·tile, ld), first: aligned
    float* const qbuf = sband + G * tile * max_ld;          // (G·tile, d)
    float* const obuf = qbuf + G * tile * d;                // (G·tile, dv)
    float* const ssink = obuf + G * tile * dv;              // (G·tile, ld_sink)
    float* const inv_total = ssink + G * tile * round_up(sinks);  // (G·tile,)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item % n_tiles, hk = (item / n_tiles) % Hkv, b = item / (n_tiles * Hkv);
      const int64_t r0 = t * tile, rows = std::min(tile, n_q - r0), m = G * rows;
      const int64_t p0 = q_offset + r0, p_last = p0 + rows - 1;
      // The band's start is rounded down to a whole vector (544 keys, not 543, at W 512 and
      // tile 32: MKL's products and the row passes ran 2-3% faster), but never below the
      // first key any query sees: keys no query sees stay out of the arithmetic (a NaN
      // there would reach the output through 0 · NaN in the product with V).
      const int64_t lo = std::max((p0 - window + 1) / WIDTH * WIDTH, first_seen);
      const int64_t hi = std::min(n_k, p_last + 1);
      const int64_t band = hi - lo, n_sink = std::min(sinks, lo);
      const int64_t ld = round_up(band), ld_sink = round_up(n_sink);  // whole vectors
      for (int64_t g = 0; g < G; ++g) {  // fold the group's heads into rows, scaled
        const float* src = qp + ((b * H + hk * G + g) * n_q + r0) * d;
        float* dst = qbuf + g * rows * d;
        for (int64_t i = 0; i < rows * d; ++i) dst[i] = src[i] * fscale;
      }
      const at::Tensor qf = view_of(qbuf, m, d);
      const float* kh = kp + (b * Hkv + hk) * n_k * d;
      const float* vh = vp + (b * Hkv + hk) * n_k * dv;
      at::Tensor sb = view_of(sband, m, band, ld);
      at::mm_out(sb, qf, view_of(const_cast<float*>(kh) + lo * d, band, d).t());
      for (int64_t row = 0; row < m; ++row) {  // sink scores: a few dot products, no BLAS call
        dots(qbuf + row * d, kh, n_sink, d, ssink + row * ld_sink);
      }
      for (int64_t row = 0; row < m; ++row) {
        const int64_t p = p0 + row % rows;
        const int64_t first = std::max(lo, p - window + 1) - lo, last = std::min(hi - 1, p) - lo;
        const int64_t sink_end = std::clamp<int64_t>(sinks - lo, 0, first);
        inv_total[row] = softmax_row(sband + row * ld, band, first, last, sink_end,
                                     ssink + row * ld_sink, n_sink);
      }
      at::Tensor of = view_of(obuf, m, dv);
      at::mm_out(of, sb, view_of(const_cast<float*>(vh) + lo * dv, band, dv));
      for (int64_t row = 0; row < m; ++row) {
        const int64_t g = row / rows, i = row % rows;
        write_row(obuf + row * dv, ssink + row * ld_sink, vh, n_sink, dv,
                  inv_total[row], op + ((b * H + hk * G + g) * n_q + r0 + i) * dv);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("banded_attention", &banded_attention, "sliding-window (+ sinks) attention, float32");
}

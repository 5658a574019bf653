// A pre-norm transformer block's work around attention, for the few rows of a decode step,
// in two calls: before attention, RMSNorm + the q/k/v projections + RoPE; after it, the
// output projection + residual, RMSNorm, SwiGLU MLP + residual.
//
// At decode every op of a block is tiny: SmolLM2-135M's block at batch 8 ran ~50 torch ops
// (views, transposes, RoPE's complex multiply, silu, mul, adds) around its 4 matmul calls,
// ~300 us of dispatch and Python a layer against ~800 us of matmul. Here the matmuls are
// packed_gemm.h's (one parallel region per group of weights sharing an input) and
// everything else is a pass over a few KB in the calling thread. Measured on a 2-core Xeon,
// a batch-8 decode step went from 44 to 37-39 ms, a batch-1 step from 35 to 31.
//
// DecodeStack runs a whole stack of such blocks for one decode step in one call: per layer,
// the two calls above around the new tokens' K/V written into the cache and decode attention
// (decode_attention.h) read from it in place. Called per block from Python, the step still
// spent ~7 ms of a 40 ms batch-8 step between the kernels (views, cache bookkeeping,
// checks, ~15 Python calls a layer). An int8 cache (one float32 scale per row) is served
// too: each new row is quantized here as `cache.quantized.quantize` does (absmax / 127,
// rounded half to even), its error added to the cache's running statistics, and attention
// reads the int8 rows with their scales.
//
// LatentDecodeStack is the same for MLA blocks (absorbed mode over a latent cache,
// latent_attention.h). On SmolLM2-135M converted to MLA (rank 128, 96 RoPE dims; `attnkit
// compare`'s mla:128 row, after a 512-token prompt) a decode step went from 19.3 to 33.0
// tokens/s (the shipped GQA model: 41.4; MLA's converted query projection is 2.3x larger).

#include <ATen/ATen.h>
#include <torch/extension.h>

#include "decode_attention.h"
#include "fast_exp.h"
#include "latent_attention.h"
#include "packed_gemm.h"
#include "rms_norm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using packed_gemm::Segment;

const float* data_or_null(const c10::optional<at::Tensor>& t, int64_t numel, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel, name,
              " must be a contiguous float32 vector of ", numel);
  return t->data_ptr<float>();
}

at::Tensor normed(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.numel() == x.size(1),
              "a norm weight must be a contiguous float32 vector of ", x.size(1));
  at::Tensor y = at::empty_like(x);
  for (int64_t r = 0; r < x.size(0); ++r)
    rms_norm_row(x.data_ptr<float>() + r * x.size(1), weight.data_ptr<float>(), float(eps),
                 x.size(1), y.data_ptr<float>() + r * x.size(1));
  return y;
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), name,
              " must be a contiguous float32 (rows, features) matrix");
}

// Rotates dims [offset, offset + 2 * half) of each of `heads` heads (head_stride apart) in
// each row (row_stride apart) of p, in place, by the row's angles (cos, sin: (rows, half)):
// pairs (2i, 2i + 1) when interleaved (GGUF), else (i, i + half) (Hugging Face).
void rotate_heads(float* p, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride,
                  int64_t offset, const float* cos, const float* sin, int64_t half,
                  bool interleaved) {
  const int64_t step = interleaved ? 2 : 1, other = interleaved ? 1 : half;
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + r * half;
    const float* s = sin + r * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* x = p + r * row_stride + h * head_stride + offset;
      for (int64_t i = 0; i < half; ++i) {
        float& a = x[i * step];
        float& b = x[i * step + other];
        const float x1 = a, x2 = b;
        a = x1 * c[i] - x2 * s[i];
        b = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

// The first 2 * half dims of each head of `t` (rows, heads * head_dim).
void rotate(at::Tensor& t, int64_t head_dim, const float* cos, const float* sin, int64_t half,
            bool interleaved) {
  rotate_heads(t.data_ptr<float>(), t.size(0), t.size(1), t.size(1) / head_dim, head_dim, 0,
               cos, sin, half, interleaved);
}

// Before attention: h = rms_norm(x); q, k, v = h W_q^T (+ b_q), h W_k^T, h W_v^T; RoPE on q
// and k. x (rows, hidden); packed: the three weights (packed_gemm::pack) with their feature
// counts `outs`; cos, sin (rows, half) float32, half <= head_dim / 2. Returns q, k, v as
// (rows, features).
std::vector<at::Tensor> attention_inputs(const at::Tensor& x, const at::Tensor& norm_weight,
                                         double eps, const std::vector<at::Tensor>& packed,
                                         const std::vector<int64_t>& outs,
                                         const std::vector<c10::optional<at::Tensor>>& biases,
                                         const at::Tensor& cos, const at::Tensor& sin,
                                         int64_t head_dim, bool interleaved) {
  check_rows(x, "x");
  TORCH_CHECK(packed.size() == 3 && outs.size() == 3 && biases.size() == 3,
              "attention_inputs takes the q, k and v weights");
  TORCH_CHECK(head_dim > 0, "head_dim must be > 0, got ", head_dim);
  const int64_t rows = x.size(0), half = cos.size(-1);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == rows &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && 2 * half <= head_dim,
              "cos and sin must be contiguous float32 (rows, half) with 2 * half <= head_dim");
  const at::Tensor h = normed(x, norm_weight, eps);
  std::vector<at::Tensor> qkv;
  std::vector<Segment> segments;
  int64_t panels = 0;
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(outs[i] % head_dim == 0, "projection ", i, " is not whole heads");
    qkv.push_back(at::empty({rows, outs[i]}, x.options()));
    segments.push_back(packed_gemm::segment(packed[i], outs[i], x.size(1), panels,
                                            data_or_null(biases[i], outs[i], "a bias"), nullptr,
                                            qkv.back().data_ptr<float>()));
    panels += segments.back().panels;
  }
  packed_gemm::multiply(h.data_ptr<float>(), rows, x.size(1), segments);
  for (int i = 0; i < 2; ++i)
    rotate(qkv[i], head_dim, cos.data_ptr<float>(), sin.data_ptr<float>(), half, interleaved);
  return qkv;
}

// After attention: y = x + attn W_o^T (+ b_o); out = y + down(silu(gate(n)) * up(n)) with
// n = rms_norm(y). x (rows, hidden), attn (rows, heads * v_dim); weights packed.
at::Tensor block_outputs(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& wo,
                         const c10::optional<at::Tensor>& bias_o, const at::Tensor& norm_weight,
                         double eps, const at::Tensor& gate, const at::Tensor& up,
                         const at::Tensor& down, int64_t intermediate) {
  check_rows(x, "x");
  check_rows(attn, "attn");
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(attn.size(0) == rows, "attn must have one row per row of x");
  at::Tensor y = at::empty_like(x);
  packed_gemm::multiply(attn.data_ptr<float>(), rows, attn.size(1),
                        {packed_gemm::segment(wo, hidden, attn.size(1), 0,
                                              data_or_null(bias_o, hidden, "bias_o"),
                                              x.data_ptr<float>(), y.data_ptr<float>())});
  const at::Tensor n = normed(y, norm_weight, eps);
  at::Tensor g = at::empty({rows, intermediate}, x.options());
  at::Tensor u = at::empty({rows, intermediate}, x.options());
  const Segment gate_part =
      packed_gemm::segment(gate, intermediate, hidden, 0, nullptr, nullptr, g.data_ptr<float>());
  packed_gemm::multiply(n.data_ptr<float>(), rows, hidden,
                        {gate_part, packed_gemm::segment(up, intermediate, hidden,
                                                         gate_part.panels, nullptr, nullptr,
                                                         u.data_ptr<float>())});
  float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
#pragma omp simd
  for (int64_t i = 0; i < rows * intermediate; ++i) gp[i] = silu(gp[i]) * upp[i];  // into g
  at::Tensor out = at::empty_like(x);
  packed_gemm::multiply(gp, rows, intermediate,
                        {packed_gemm::segment(down, hidden, intermediate, 0, nullptr,
                                              y.data_ptr<float>(), out.data_ptr<float>())});
  return out;
}

// Where each sequence's new token goes in a cache of `n_blocks` blocks of `block_size`
// tokens: block_table (batch, max_blocks) and starts (batch,) as int64, and per sequence
// the new token's block and offset, checked here since the token is written before any
// kernel reads. With `every_read`, every block the sequence's keys lie in is checked too
// (for readers that do not check the table themselves).
struct TokenPlaces {
  at::Tensor table, starts;
  std::vector<int64_t> block, offset;
};

TokenPlaces token_places(const at::Tensor& block_table, const at::Tensor& starts_in,
                         int64_t batch, int64_t block_size, int64_t n_blocks, bool every_read) {
  TokenPlaces places{block_table.to(at::kLong).contiguous(),
                     starts_in.to(at::kLong).contiguous(), std::vector<int64_t>(batch),
                     std::vector<int64_t>(batch)};
  const at::Tensor& table = places.table;
  TORCH_CHECK(table.dim() == 2 && table.size(0) == batch && places.starts.dim() == 1 &&
                  places.starts.size(0) == batch,
              "block_table must be (batch, max_blocks) and starts (batch,)");
  const int64_t* tp = table.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = places.starts.data_ptr<int64_t>()[b];
    TORCH_CHECK(start >= 0 && start / block_size < table.size(1), "sequence ", b,
                " starts at ", start, ", past its block table");
    for (int64_t i = every_read ? 0 : start / block_size; i <= start / block_size; ++i) {
      const int64_t id = tp[b * table.size(1) + i];
      TORCH_CHECK(id >= 0 && id < n_blocks, "block id ", id, " is outside the cache's ",
                  n_blocks, " blocks");
    }
    places.block[b] = tp[b * table.size(1) + start / block_size];
    places.offset[b] = start % block_size;
  }
  return places;
}

// max that keeps a NaN, as torch's max reduction does.
inline double nan_max(double a, double b) { return std::isnan(a) || a > b ? a : b; }

// The tensors of one block, packed once: the norms, the packed q/k/v, output and MLP
// weights, the optional q/k/v and output biases.
struct BlockTensors {
  at::Tensor attn_norm, mlp_norm;
  double attn_eps, mlp_eps;
  std::vector<at::Tensor> qkv;
  std::vector<c10::optional<at::Tensor>> qkv_bias;
  at::Tensor wo, gate, up, down;
  c10::optional<at::Tensor> bias_o;
};

// A stack of pre-norm GQA blocks (heads query / kv_heads KV heads of head_dim, SwiGLU of
// `intermediate` features), run for one decode step: every sequence adds one token.
class DecodeStack {
 public:
  // layers: per block [attn_norm, q, k, v, wo, mlp_norm, gate, up, down] (weights packed),
  // biases: per block [b_q, b_k, b_v, b_o] (each optional), eps: per block (attn, mlp).
  DecodeStack(const std::vector<std::vector<at::Tensor>>& layers,
              const std::vector<std::vector<c10::optional<at::Tensor>>>& biases,
              const std::vector<std::pair<double, double>>& eps, int64_t heads,
              int64_t kv_heads, int64_t head_dim, int64_t intermediate, bool interleaved)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), intermediate_(intermediate),
        interleaved_(interleaved) {
    TORCH_CHECK(layers.size() == biases.size() && layers.size() == eps.size(),
                "one entry per block in layers, biases and eps");
    TORCH_CHECK(head_dim > 0 && kv_heads > 0 && heads % kv_heads == 0,
                "heads must be a positive multiple of kv_heads and head_dim > 0");
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& t = layers[i];
      TORCH_CHECK(t.size() == 9 && biases[i].size() == 4, "block ", i,
                  " needs 9 tensors and 4 biases");
      blocks_.push_back({t[0], t[5], eps[i].first, eps[i].second, {t[1], t[2], t[3]},
                         {biases[i][0], biases[i][1], biases[i][2]}, t[4], t[6], t[7], t[8],
                         biases[i][3]});
    }
  }

  int64_t size() const { return static_cast<int64_t>(blocks_.size()); }

  // x (batch, hidden): the step's one token per sequence, embedded. k_cache, v_cache:
  // (layers, blocks, block_size, kv_heads, head_dim), any strides with head_dim contiguous
  // (a paged pool as it is; a contiguous cache's (layers, slots, kv_heads, capacity, d)
  // buffer transposed, one block per slot). block_table (batch, max_blocks): each
  // sequence's blocks; starts (batch,): its length before this token, which lands at that
  // position. cos, sin (batch, half): the token's RoPE angles. Int8 caches come with
  // k_scale, v_scale (layers, blocks, block_size, kv_heads) float32, any strides, and
  // error, a float64 (3,) of [max abs error, max error / row absmax, sum of the latter]
  // that this step's rows update. window > 0: each token sees only the last `window` keys of
  // its table and the first `sinks` (the layers' sliding_window(window) | sinks(sinks)).
  // Returns the stack's output.
  at::Tensor run(const at::Tensor& x_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& block_table, const at::Tensor& starts_in,
                 const at::Tensor& cos, const at::Tensor& sin,
                 const c10::optional<at::Tensor>& k_scale,
                 const c10::optional<at::Tensor>& v_scale,
                 const c10::optional<at::Tensor>& error, int64_t window, int64_t sinks) const {
    check_rows(x_in, "x");
    const int64_t batch = x_in.size(0);
    const bool int8 = k_cache.scalar_type() == at::kChar;
    for (const at::Tensor* c : {&k_cache, &v_cache})
      TORCH_CHECK(c->dim() == 5 && c->scalar_type() == k_cache.scalar_type() &&
                      (int8 || c->scalar_type() == at::kFloat) && c->stride(4) == 1 &&
                      c->size(0) >= size() && c->size(3) == kv_heads_ &&
                      c->size(4) == head_dim_ && c->size(1) == k_cache.size(1) &&
                      c->size(2) == k_cache.size(2),
                  "k_cache and v_cache must both be float32 or int8 (layers >= ", size(),
                  ", blocks, block_size, ", kv_heads_, ", ", head_dim_,
                  "), head_dim contiguous");
    TORCH_CHECK(int8 == (k_scale.has_value() && v_scale.has_value() && error.has_value()),
                "k_scale, v_scale and error go with int8 caches, and only with them");
    if (int8) {
      for (const at::Tensor* t : {&*k_scale, &*v_scale})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 &&
                        t->sizes() == k_cache.sizes().slice(0, 4),
                    "k_scale and v_scale must be float32 (layers, blocks, block_size, kv_heads)");
      TORCH_CHECK(error->scalar_type() == at::kDouble && error->is_contiguous() &&
                      error->numel() == 3,
                  "error must be a contiguous float64 tensor of 3");
    }
    // the attention kernel checks the table for its reads
    const TokenPlaces places = token_places(block_table, starts_in, batch, k_cache.size(2),
                                            k_cache.size(1), /*every_read=*/false);
    const at::Tensor& table = places.table;
    const std::vector<int64_t>& block = places.block;
    const std::vector<int64_t>& offset = places.offset;
    const at::Tensor lengths = places.starts + 1;
    const std::vector<int64_t> outs = {heads_ * head_dim_, kv_heads_ * head_dim_,
                                       kv_heads_ * head_dim_};
    const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
    at::Tensor x = x_in;
    for (int64_t l = 0; l < size(); ++l) {
      const BlockTensors& w = blocks_[l];
      const std::vector<at::Tensor> qkv = attention_inputs(
          x, w.attn_norm, w.attn_eps, w.qkv, outs, w.qkv_bias, cos, sin, head_dim_, interleaved_);
      const at::Tensor k_layer = k_cache.select(0, l), v_layer = v_cache.select(0, l);
      c10::optional<at::Tensor> k_scales, v_scales;
      if (int8) {
        k_scales = k_scale->select(0, l);
        v_scales = v_scale->select(0, l);
        quantize_into(qkv[1], k_layer, *k_scales, block, offset, error->data_ptr<double>());
        quantize_into(qkv[2], v_layer, *v_scales, block, offset, error->data_ptr<double>());
      } else {
        store(qkv[1], k_layer, block, offset);
        store(qkv[2], v_layer, block, offset);
      }
      const at::Tensor attn = decode_attention::decode(
          qkv[0].view({batch, heads_, head_dim_}), k_layer, v_layer, table, lengths, scale, 0,
          k_scales, v_scales, /*heads_before_tokens=*/false, window, sinks)[0];
      x = block_outputs(x, attn.view({batch, heads_ * head_dim_}), w.wo, w.bias_o, w.mlp_norm,
                        w.mlp_eps, w.gate, w.up, w.down, intermediate_);
    }
    return x;
  }

 private:
  // rows (batch, kv_heads * head_dim) into cache[block[b]][offset[b]] (kv_heads, head_dim).
  void store(const at::Tensor& rows, const at::Tensor& cache, const std::vector<int64_t>& block,
             const std::vector<int64_t>& offset) const {
    const float* src = rows.data_ptr<float>();
    float* dst = cache.data_ptr<float>();
    for (size_t b = 0; b < block.size(); ++b)
      for (int64_t h = 0; h < kv_heads_; ++h)
        std::copy_n(src + (b * kv_heads_ + h) * head_dim_, head_dim_,
                    dst + block[b] * cache.stride(0) + offset[b] * cache.stride(1) +
                        h * cache.stride(2));
  }

  // rows (batch, kv_heads * head_dim) into the int8 cache[block[b]][offset[b]] with their
  // scales, as `quantize` does (float32: s = absmax / 127, q = round(x / s), half to even,
  // clamped to +-127; an all-zero row stores zeros with scale 0), and their error into
  // `error` as QuantizedCache._track_error counts it.
  void quantize_into(const at::Tensor& rows, const at::Tensor& cache, const at::Tensor& scales,
                     const std::vector<int64_t>& block, const std::vector<int64_t>& offset,
                     double* error) const {
    const float* src = rows.data_ptr<float>();
    int8_t* dst = cache.data_ptr<int8_t>();
    float* scale_out = scales.data_ptr<float>();
    for (size_t b = 0; b < block.size(); ++b)
      for (int64_t h = 0; h < kv_heads_; ++h) {
        const float* x = src + (b * kv_heads_ + h) * head_dim_;
        int8_t* q = dst + block[b] * cache.stride(0) + offset[b] * cache.stride(1) +
                    h * cache.stride(2);
        // NaN propagates as in torch: a row holding one gets a NaN scale (its values stored
        // as x rounded, NaN itself as 0, as torch's conversion gives) and a NaN error.
        float absmax = 0.0f;
        for (int64_t d = 0; d < head_dim_; ++d) {
          const float a = std::fabs(x[d]);
          if (std::isnan(a) || a > absmax) absmax = a;
        }
        const float s = absmax / 127.0f, divisor = s > 0.0f ? s : 1.0f;
        scale_out[block[b] * scales.stride(0) + offset[b] * scales.stride(1) +
                  h * scales.stride(2)] = s;
        for (int64_t d = 0; d < head_dim_; ++d) {
          const float r = std::clamp(std::nearbyint(x[d] / divisor), -127.0f, 127.0f);
          q[d] = std::isnan(r) ? int8_t{0} : static_cast<int8_t>(r);
          // |x - what is read back|: the product rounded to float32 first, as torch does
          // (a contracted x - r * s, one FMA, would measure the unrounded product).
          const float back = r * s;
          const float err = static_cast<float>(std::fabs(double(x[d]) - double(back)));
          const float rel = absmax > 0.0f ? err / absmax : 0.0f;
          error[0] = nan_max(error[0], double(err));
          error[1] = nan_max(error[1], double(rel));
          error[2] += rel;
        }
      }
  }

  std::vector<BlockTensors> blocks_;
  int64_t heads_, kv_heads_, head_dim_, intermediate_;
  bool interleaved_;
};

// The tensors of one MLA block (layers.latent.LatentAttention without a query latent),
// packed once: the norms, the packed q and kv_a projections, the kv_a latent's norm weight
// (empty: none), wkv_b split per head into W_uk (heads, nope, kv_rank) and W_uv
// (heads, v_dim, kv_rank), the packed output and MLP weights, the optional biases.
struct LatentBlockTensors {
  at::Tensor attn_norm, mlp_norm, kv_norm;
  double attn_eps, mlp_eps, kv_eps, scale;
  int64_t nope;  // query/key dims without RoPE: a conversion may keep more in some layers
  at::Tensor wq, wkv_a, w_uk, w_uv, wo, gate, up, down;
  c10::optional<at::Tensor> bias_q, bias_kv_a, bias_o;
};

// A stack of pre-norm MLA blocks, run for one decode step in absorbed mode: per layer
// RMSNorm, [q | latent, RoPE key] = h [W_q; W_kv_a]^T (one pass over both weights), the
// latent's RMSNorm, RoPE on q's and the key's RoPE dims, the latent and RoPE key written into
// the cache, each head's query moved into latent space (W_uk^T q_nope), attention over the
// cached latents (latent_attention.h), W_uv back out of it, then block_outputs.
class LatentDecodeStack {
 public:
  // layers: per block [attn_norm, wq, wkv_a, kv_norm (empty: none), w_uk, w_uv, wo,
  // mlp_norm, gate, up, down] (projection and MLP weights packed); biases: per block [b_q,
  // b_kv_a, b_o]; eps: per block (attn, mlp, kv); scales: per block, the score scale; dims:
  // heads, kv_rank, rope_heads, rope_dim, v_dim, intermediate (nope_dim per block: w_uk's).
  LatentDecodeStack(const std::vector<std::vector<at::Tensor>>& layers,
                    const std::vector<std::vector<c10::optional<at::Tensor>>>& biases,
                    const std::vector<std::vector<double>>& eps,
                    const std::vector<double>& scales, const std::vector<int64_t>& dims,
                    bool interleaved)
      : interleaved_(interleaved) {
    TORCH_CHECK(dims.size() == 6,
                "dims: heads, kv_rank, rope_heads, rope_dim, v_dim, intermediate");
    heads_ = dims[0], kv_rank_ = dims[1], rope_heads_ = dims[2], rope_dim_ = dims[3];
    v_dim_ = dims[4], intermediate_ = dims[5];
    TORCH_CHECK(heads_ > 0 && kv_rank_ > 0 && rope_heads_ > 0 && heads_ % rope_heads_ == 0 &&
                    rope_dim_ > 0 && rope_dim_ % 2 == 0 && v_dim_ > 0,
                "MLA dims must be positive, heads a multiple of rope_heads, rope_dim even");
    TORCH_CHECK(layers.size() == biases.size() && layers.size() == eps.size() &&
                    layers.size() == scales.size(),
                "one entry per block in layers, biases, eps and scales");
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& t = layers[i];
      TORCH_CHECK(t.size() == 11 && biases[i].size() == 3 && eps[i].size() == 3, "block ", i,
                  " needs 11 tensors, 3 biases and 3 eps");
      for (const at::Tensor* w : {&t[4], &t[5]})
        TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->dim() == 3 &&
                        w->size(0) == heads_ && w->size(2) == kv_rank_,
                    "w_uk and w_uv must be contiguous float32 (heads, dim, kv_rank)");
      TORCH_CHECK(t[5].size(1) == v_dim_, "w_uv must be (heads, ", v_dim_, ", kv_rank)");
      TORCH_CHECK(t[3].numel() == 0 || (t[3].scalar_type() == at::kFloat &&
                                         t[3].is_contiguous() && t[3].numel() == kv_rank_),
                  "kv_norm must be empty (no norm) or a contiguous float32 vector of kv_rank");
      blocks_.push_back({t[0], t[7], t[3], eps[i][0], eps[i][1], eps[i][2], scales[i],
                         t[4].size(1), t[1], t[2], t[4],
                         t[5], t[6], t[8], t[9], t[10], biases[i][0], biases[i][1],
                         biases[i][2]});
    }
  }

  int64_t size() const { return static_cast<int64_t>(blocks_.size()); }

  // x (batch, hidden): the step's one token per sequence, embedded. latents, rope_keys:
  // (layers, blocks, block_size, 1, kv_rank) and (..., 1, rope_heads * rope_dim), any
  // strides with the last dim contiguous (a LatentCache's buffers transposed, one block per
  // slot); block_table, starts as DecodeStack::run's; cos, sin (layers, batch, rope_dim / 2):
  // the tokens' angles for each layer's RoPE pairs. Returns the stack's output.
  at::Tensor run(const at::Tensor& x_in, const at::Tensor& latents, const at::Tensor& rope_keys,
                 const at::Tensor& block_table, const at::Tensor& starts_in,
                 const at::Tensor& cos, const at::Tensor& sin) const {
    check_rows(x_in, "x");
    const int64_t batch = x_in.size(0), half = rope_dim_ / 2;
    const int64_t widths[2] = {kv_rank_, rope_heads_ * rope_dim_};
    const at::Tensor* caches[2] = {&latents, &rope_keys};
    for (int i = 0; i < 2; ++i)
      TORCH_CHECK(caches[i]->dim() == 5 && caches[i]->scalar_type() == at::kFloat &&
                      caches[i]->stride(4) == 1 && caches[i]->size(0) >= size() &&
                      caches[i]->size(3) == 1 && caches[i]->size(4) == widths[i] &&
                      caches[i]->size(1) == latents.size(1) &&
                      caches[i]->size(2) == latents.size(2),
                  "latents and rope_keys must be float32 (layers >= ", size(),
                  ", blocks, block_size, 1, ", kv_rank_, " / ", widths[1],
                  "), last dim contiguous");
    TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && cos.size(0) == size() &&
                    cos.size(1) == batch && cos.size(2) == half &&
                    cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                    cos.is_contiguous() && sin.is_contiguous(),
                "cos and sin must be contiguous float32 (layers, batch, rope_dim / 2 = ", half,
                ")");
    // latent_attention::attend reads the cache unchecked: every block it reads is checked
    const int64_t block_size = latents.size(2);
    const TokenPlaces places = token_places(block_table, starts_in, batch, block_size,
                                            latents.size(1), /*every_read=*/true);
    const int64_t* tp = places.table.data_ptr<int64_t>();
    const int64_t kv_width = kv_rank_ + rope_heads_ * rope_dim_;
    const auto opts = x_in.options();
    at::Tensor kv = at::empty({batch, kv_width}, opts);
    at::Tensor q_latent = at::empty({batch, heads_, kv_rank_}, opts);
    at::Tensor q_rope = at::empty({batch, heads_, rope_dim_}, opts);
    at::Tensor o = at::empty({batch, heads_, kv_rank_}, opts);
    at::Tensor attn = at::empty({batch, heads_ * v_dim_}, opts);
    at::Tensor x = x_in;
    for (int64_t l = 0; l < size(); ++l) {
      const LatentBlockTensors& w = blocks_[l];
      const int64_t nope = w.nope, qk = nope + rope_dim_;
      const at::Tensor q = at::empty({batch, heads_ * qk}, opts);
      const at::Tensor h = normed(x, w.attn_norm, w.attn_eps);
      const Segment q_part = packed_gemm::segment(
          w.wq, heads_ * qk, x.size(1), 0, data_or_null(w.bias_q, heads_ * qk, "b_q"), nullptr,
          q.data_ptr<float>());
      packed_gemm::multiply(h.data_ptr<float>(), batch, x.size(1),
                            {q_part, packed_gemm::segment(
                                         w.wkv_a, kv_width, x.size(1), q_part.panels,
                                         data_or_null(w.bias_kv_a, kv_width, "b_kv_a"),
                                         nullptr, kv.data_ptr<float>())});
      float* qp = q.data_ptr<float>();
      float* kvp = kv.data_ptr<float>();
      if (w.kv_norm.numel() > 0)
        for (int64_t b = 0; b < batch; ++b)
          rms_norm_row(kvp + b * kv_width, w.kv_norm.data_ptr<float>(), float(w.kv_eps),
                       kv_rank_, kvp + b * kv_width);
      const float* cp = cos.data_ptr<float>() + l * batch * half;  // this layer's pairs
      const float* sp = sin.data_ptr<float>() + l * batch * half;
      rotate_heads(qp, batch, heads_ * qk, heads_, qk, nope, cp, sp, half, interleaved_);
      rotate_heads(kvp, batch, kv_width, rope_heads_, rope_dim_, kv_rank_, cp, sp, half,
                   interleaved_);
      const at::Tensor lat_layer = latents.select(0, l), key_layer = rope_keys.select(0, l);
      for (int64_t b = 0; b < batch; ++b) {  // the new token's latent and RoPE keys
        const int64_t block = places.block[b], offset = places.offset[b];
        std::copy_n(kvp + b * kv_width, kv_rank_,
                    lat_layer.data_ptr<float>() + block * lat_layer.stride(0) +
                        offset * lat_layer.stride(1));
        std::copy_n(kvp + b * kv_width + kv_rank_, widths[1],
                    key_layer.data_ptr<float>() + block * key_layer.stride(0) +
                        offset * key_layer.stride(1));
      }
      // q_nope · (W_uk c) = (W_uk^T q_nope) · c: each head's query moves into latent space
      float* qlp = q_latent.data_ptr<float>();
      float* qrp = q_rope.data_ptr<float>();
      const float* uk = w.w_uk.data_ptr<float>();
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t hd = 0; hd < heads_; ++hd) {
          const float* qh = qp + b * heads_ * qk + hd * qk;
          float* ql = qlp + (b * heads_ + hd) * kv_rank_;
          std::fill(ql, ql + kv_rank_, 0.0f);
          for (int64_t n = 0; n < nope; ++n) {
            const float* row = uk + (hd * nope + n) * kv_rank_;
#pragma omp simd
            for (int64_t i = 0; i < kv_rank_; ++i) ql[i] += qh[n] * row[i];
          }
          std::copy_n(qh + nope, rope_dim_, qrp + (b * heads_ + hd) * rope_dim_);
        }
      latent_attention::attend(
          qlp, qrp, batch, heads_, kv_rank_, rope_heads_, rope_dim_,
          {lat_layer.data_ptr<float>(), lat_layer.stride(0), lat_layer.stride(1)},
          {key_layer.data_ptr<float>(), key_layer.stride(0), key_layer.stride(1)}, tp,
          places.table.size(1), block_size, places.starts.data_ptr<int64_t>(), float(w.scale),
          o.data_ptr<float>());
      // W_uv c, summed after the softmax: each head's output leaves latent space
      const float* uv = w.w_uv.data_ptr<float>();
      const float* op = o.data_ptr<float>();
      float* ap = attn.data_ptr<float>();
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t hd = 0; hd < heads_; ++hd)
          for (int64_t j = 0; j < v_dim_; ++j)
            ap[(b * heads_ + hd) * v_dim_ + j] = latent_attention::dot(
                uv + (hd * v_dim_ + j) * kv_rank_, op + (b * heads_ + hd) * kv_rank_, kv_rank_);
      x = block_outputs(x, attn, w.wo, w.bias_o, w.mlp_norm, w.mlp_eps, w.gate, w.up, w.down,
                        intermediate_);
    }
    return x;
  }

 private:
  std::vector<LatentBlockTensors> blocks_;
  int64_t heads_, kv_rank_, rope_heads_, rope_dim_, v_dim_, intermediate_;
  bool interleaved_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("VECTOR_BYTES") = REGISTER_BYTES;  // the width the kernels were built for
  m.def("pack", &packed_gemm::pack,
        "a (out, in) float32 weight as (ceil(out / P), in, P) panels, P = two vectors' floats");
  m.def("attention_inputs", &attention_inputs,
        "rms_norm, the q/k/v projections and RoPE of a decode step's rows (float32)",
        py::call_guard<py::gil_scoped_release>());
  m.def("block_outputs", &block_outputs,
        "output projection + residual, rms_norm, SwiGLU MLP + residual (float32)",
        py::call_guard<py::gil_scoped_release>());
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<const std::vector<std::vector<at::Tensor>>&,
                    const std::vector<std::vector<c10::optional<at::Tensor>>>&,
                    const std::vector<std::pair<double, double>>&, int64_t, int64_t, int64_t,
                    int64_t, bool>())
      .def("__len__", &DecodeStack::size)
      .def("run", &DecodeStack::run, "one decode step through every block and the cache",
           py::arg("x"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"),
           py::arg("starts"), py::arg("cos"), py::arg("sin"), py::arg("k_scale") = py::none(),
           py::arg("v_scale") = py::none(), py::arg("error") = py::none(),
           py::arg("window") = 0, py::arg("sinks") = 0, py::call_guard<py::gil_scoped_release>());
  py::class_<LatentDecodeStack>(m, "LatentDecodeStack")
      .def(py::init<const std::vector<std::vector<at::Tensor>>&,
                    const std::vector<std::vector<c10::optional<at::Tensor>>>&,
                    const std::vector<std::vector<double>>&, const std::vector<double>&,
                    const std::vector<int64_t>&, bool>())
      .def("__len__", &LatentDecodeStack::size)
      .def("run", &LatentDecodeStack::run, "one MLA decode step through every block and the cache",
           py::arg("x"), py::arg("latents"), py::arg("rope_keys"), py::arg("block_table"),
           py::arg("starts"), py::arg("cos"), py::arg("sin"),
           py::call_guard<py::gil_scoped_release>());
}

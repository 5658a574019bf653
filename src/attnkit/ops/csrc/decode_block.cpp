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

#include <ATen/ATen.h>
#include <torch/extension.h>

#include "fast_exp.h"
#include "packed_gemm.h"
#include "rms_norm.h"

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

// Rotates the first 2 * half dims of each head of `t` (rows, heads * head_dim) in place by
// the row's angles (cos, sin: (rows, half)): pairs (2i, 2i + 1) when interleaved (GGUF),
// else (i, i + half) (Hugging Face).
void rotate(at::Tensor& t, int64_t head_dim, const float* cos, const float* sin, int64_t half,
            bool interleaved) {
  const int64_t rows = t.size(0), heads = t.size(1) / head_dim;
  float* p = t.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + r * half;
    const float* s = sin + r * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* x = p + (r * heads + h) * head_dim;
      const int64_t step = interleaved ? 2 : 1, other = interleaved ? 1 : half;
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &packed_gemm::pack, "a (out, in) float32 weight as (ceil(out / 32), in, 32) panels");
  m.def("attention_inputs", &attention_inputs,
        "rms_norm, the q/k/v projections and RoPE of a decode step's rows (float32)",
        py::call_guard<py::gil_scoped_release>());
  m.def("block_outputs", &block_outputs,
        "output projection + residual, rms_norm, SwiGLU MLP + residual (float32)",
        py::call_guard<py::gil_scoped_release>());
}

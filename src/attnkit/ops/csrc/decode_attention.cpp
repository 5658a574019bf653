// The fused CPU decode-attention kernel as a Python module; the kernel itself is in
// decode_attention.h, shared with decode_block.cpp (a whole decode step in one call).

#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "decode_attention.h"

using decode_attention::decode;

// Whether t is a dense CPU tensor of `dims` dims (its rows contiguous, where `rows`).
static bool plain(const at::Tensor& t, int64_t dims, bool rows = true) {
  return t.defined() && t.layout() == at::kStrided && !t.is_nested() && t.device().is_cpu() &&
         t.dim() == dims && (!rows || t.stride(dims - 1) == 1);
}

// Whether q, k and v share a dtype the kernel takes (int8 K/V come only by name) and autograd
// needs no backward through them (the kernel has none).
static bool kernel_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const auto dtype = q.scalar_type();
  const bool kernel_dtype = dtype == at::kFloat || dtype == at::kDouble ||
                            dtype == at::kBFloat16 || dtype == at::kHalf;
  const bool grad = at::GradMode::is_enabled() &&
                    (q.requires_grad() || k.requires_grad() || v.requires_grad());
  return kernel_dtype && k.scalar_type() == dtype && v.scalar_type() == dtype && !grad;
}

static bool integer_index(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

// The short ways of attention() (plain_decode in backends/cpu_decode.py) and paged_decode()
// (plain_paged_decode in cpu_decode.py): the kernel's answer (out, lse) for a plain call, or
// None for any other call, valid or not, which then takes the full path (whose checks name
// what is wrong). `scale` <= 0 means 1 / sqrt(d). The checks are here rather than in Python
// because there each tensor attribute is a trip through torch's Python bindings: the same
// checks cost ~25 us a call from cold caches (~2 us hot), on a kernel call of ~35.

// The kernel's scale: `scale`, or 1 / sqrt(dim) where it is 0 (None in Python).
static double scale_or_default(double scale, int64_t dim) {
  return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(dim));
}

// (out, lse): a tuple in Python, as the full path returns (a vector would come as a list).
using Answer = std::tuple<at::Tensor, at::Tensor>;
static Answer answer(const std::vector<at::Tensor>& out_lse) { return {out_lse[0], out_lse[1]}; }

// q (batch, heads, 1, d) against a contiguous cache's k, v (batch, kv_heads, n, d / dv).
std::optional<Answer> try_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 double scale) {
  if (!(plain(q, 4) && plain(k, 4) && plain(v, 4) && kernel_inputs(q, k, v)))
    return std::nullopt;
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3);
  const int64_t kv_heads = k.size(1), n = k.size(2);
  const bool shapes = q.size(2) == 1 && heads > 0 && dim > 0 && k.size(0) == batch &&
                      v.size(0) == batch && kv_heads > 0 && v.size(1) == kv_heads &&
                      heads % kv_heads == 0 && n > 0 && v.size(2) == n && k.size(3) == dim &&
                      v.size(3) > 0;
  if (!shapes) return std::nullopt;
  return answer(decode(q, k, v, std::nullopt, std::nullopt, scale_or_default(scale, dim), 0,
                       std::nullopt, std::nullopt, /*heads_before_tokens=*/true));
}

// q (batch, heads, d) against a paged pool's k, v (num_blocks, block_size, kv_heads, d / dv)
// through block_table (batch, max_blocks) and lengths (batch,), integer. The kernel checks
// the lengths and block ids itself, with paged_decode's messages, so a bad value raises here
// as on the full path. num_splits 0: chosen by the kernel. window 0: every token; else the
// last `window` and the first `sinks`.
std::optional<Answer> try_paged_decode(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& block_table,
                                       const at::Tensor& lengths, double scale,
                                       int64_t num_splits, int64_t window, int64_t sinks) {
  if (!(plain(q, 3) && plain(k, 4) && plain(v, 4) && kernel_inputs(q, k, v) &&
        plain(block_table, 2, false) && plain(lengths, 1, false) && integer_index(block_table) &&
        integer_index(lengths) && num_splits >= 0 && window >= 0 && sinks >= 0))
    return std::nullopt;
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t num_blocks = k.size(0), block_size = k.size(1), kv_heads = k.size(2);
  const bool shapes = heads > 0 && dim > 0 && num_blocks > 0 && block_size > 0 && kv_heads > 0 &&
                      heads % kv_heads == 0 && k.size(3) == dim && v.size(0) == num_blocks &&
                      v.size(1) == block_size && v.size(2) == kv_heads && v.size(3) > 0 &&
                      block_table.size(0) == batch && lengths.size(0) == batch;
  if (!shapes) return std::nullopt;
  return answer(decode(q, k, v, block_table, lengths, scale_or_default(scale, dim), num_splits,
                       std::nullopt, std::nullopt, /*heads_before_tokens=*/false, window, sinks));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "fused decode attention over a paged or contiguous K/V cache",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("block_table"), py::arg("lengths"),
        py::arg("scale"), py::arg("num_splits"), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none(), py::arg("heads_before_tokens") = false,
        py::arg("window") = 0, py::arg("sinks") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("try_decode", &try_decode,
        "decode attention for a plain call on a contiguous cache, or None for any other call",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());
  m.def("try_paged_decode", &try_paged_decode,
        "decode attention for a plain call on a paged pool, or None for any other call",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("block_table"), py::arg("lengths"),
        py::arg("scale"), py::arg("num_splits"), py::arg("window") = 0, py::arg("sinks") = 0,
        py::call_guard<py::gil_scoped_release>());
}

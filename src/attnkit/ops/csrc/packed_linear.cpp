// y_i = x W_i^T (+ b_i) for a few rows of x against weights packed into panels (the kernel
// and its measurements are in packed_gemm.h).

#include <ATen/ATen.h>
#include <torch/extension.h>

#include "packed_gemm.h"

#include <cstdint>
#include <vector>

namespace {

// y_i = x W_i^T (+ b_i) for every packed W_i (out_i real features): one parallel region
// over all their panels. x (rows, in) float32 contiguous; the Python side checks shapes and
// picks this path.
std::vector<at::Tensor> packed_linear_many(const at::Tensor& x,
                                           const std::vector<at::Tensor>& packed,
                                           const std::vector<int64_t>& outs,
                                           const std::vector<c10::optional<at::Tensor>>& biases) {
  TORCH_CHECK(packed.size() == outs.size() && packed.size() == biases.size(),
              "one feature count and one bias (or None) per packed weight");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 matrix");
  const int64_t rows = x.size(0), in = x.size(1);
  std::vector<at::Tensor> outputs;
  std::vector<packed_gemm::Segment> segments;
  int64_t panels = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    const bool has_bias = biases[i].has_value() && biases[i]->defined();
    if (has_bias) {
      TORCH_CHECK(biases[i]->scalar_type() == at::kFloat && biases[i]->is_contiguous() &&
                      biases[i]->numel() == outs[i],
                  "bias must be a contiguous float32 vector of ", outs[i]);
    }
    outputs.push_back(at::empty({rows, outs[i]}, x.options()));
    segments.push_back(packed_gemm::segment(packed[i], outs[i], in, panels,
                                            has_bias ? biases[i]->data_ptr<float>() : nullptr,
                                            nullptr, outputs.back().data_ptr<float>()));
    panels += segments.back().panels;
  }
  packed_gemm::multiply(x.data_ptr<float>(), rows, in, segments);
  return outputs;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("VECTOR_BYTES") = REGISTER_BYTES;  // the width the kernels were built for
  m.def("pack", &packed_gemm::pack,
        "a (out, in) float32 weight as (ceil(out / P), in, P) panels, P = two vectors' floats");
  m.def("packed_linear_many", &packed_linear_many,
        "[x W_i^T (+ b_i)] for packed weights W_i in one parallel region (float32)",
        py::call_guard<py::gil_scoped_release>());
}

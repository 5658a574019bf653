// The fused CPU decode-attention kernel as a Python module; the kernel itself is in
// decode_attention.h, shared with decode_block.cpp (a whole decode step in one call).

#include <torch/extension.h>

#include "decode_attention.h"

using decode_attention::decode;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "fused decode attention over a paged or contiguous K/V cache",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("block_table"), py::arg("lengths"),
        py::arg("scale"), py::arg("num_splits"), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none(), py::arg("heads_before_tokens") = false,
        py::call_guard<py::gil_scoped_release>());
}

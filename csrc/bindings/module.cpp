// The module wgan_kernels._C: whether it was built with CUDA, and each op family's bindings
// (multi_tensor.cpp, penalty.cpp, spectral_norm.cpp in this folder).
#include <torch/extension.h>

#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wgan_kernels compiled kernels (CPU always; CUDA when built with it)";
#ifdef WGAN_KERNELS_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  wk::bindings::register_multi_tensor(m);
  wk::bindings::register_penalty(m);
  wk::bindings::register_spectral_norm(m);
}

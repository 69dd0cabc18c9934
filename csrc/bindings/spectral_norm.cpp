// Bindings of the spectral-norm power iteration's CPU kernel (csrc/cpu/spectral_norm.cpp):
// power_iteration_, with its argument checks.
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "../wk_kernels.h"
#include "common.h"

namespace wk {
namespace bindings {
namespace {

// Updates us[i], vs[i] in place; returns the sigmas (float64, one per weight). The weights share
// one dtype and go through the kernel together (one parallel region per iteration); the caller,
// power_iteration_ in wgan_kernels/ops/spectral_norm.py, has grouped them by (device, dtype).
at::Tensor power_iteration_(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& us,
                            const std::vector<at::Tensor>& vs, int64_t n_power_iterations, double eps) {
  TORCH_CHECK_VALUE(us.size() == weights.size() && vs.size() == weights.size(),
                    "weights, us, vs: expected lists of equal length, got ", weights.size(), ", ", us.size(), ", ",
                    vs.size());
  TORCH_CHECK_VALUE(n_power_iterations >= 1, "n_power_iterations: expected an int >= 1, got ", n_power_iterations);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps: expected a finite number > 0, got ", eps);
  const size_t n = weights.size();
  at::Tensor sigmas = at::empty({static_cast<int64_t>(n)}, at::kDouble);
  if (n == 0) return sigmas;
  std::vector<at::Tensor> dense(n);  // W as it is when contiguous, else a contiguous copy
  std::vector<wk::cpu::Matrix> mats(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK_VALUE(w.dim() == 2 && w.device().is_cpu(), "weights[", i, "]: expected a 2-D CPU tensor, got ",
                      w.dim(), "-D on ", w.device());
    kernel_dtype(w, "weights", i);
    TORCH_CHECK_VALUE(w.scalar_type() == weights[0].scalar_type(), "weights[", i, "]: expected dtype ",
                      py_name(weights[0].scalar_type()), " like weights[0], got ", py_name(w.scalar_type()),
                      "; one call takes one dtype");
    for (const auto* t : {&us[i], &vs[i]}) {
      const bool is_u = t == &us[i];
      const int64_t len = is_u ? w.size(0) : w.size(1);
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == len && t->scalar_type() == w.scalar_type() &&
                            t->device().is_cpu() && t->is_contiguous(),
                        is_u ? "us[" : "vs[", i, "]: expected a contiguous 1-D CPU tensor of ", len,
                        " values and dtype ", py_name(w.scalar_type()), ", got ", py_shape(t->sizes()), " ",
                        py_name(t->scalar_type()));
      check_writable(*t, is_u ? "us" : "vs", i);
    }
    dense[i] = w.detach().contiguous();
    mats[i] = wk::cpu::Matrix{dense[i].data_ptr(), dense[i].size(0), dense[i].size(1), us[i].data_ptr(),
                              vs[i].data_ptr()};
  }
  wk::cpu::power_iteration(mats.data(), static_cast<int>(n), kernel_dtype(weights[0], "weights", 0),
                           static_cast<int>(n_power_iterations), eps, sigmas.data_ptr<double>());
  for (size_t i = 0; i < n; ++i) {
    bump_version(us[i]);
    bump_version(vs[i]);
  }
  return sigmas;
}

}  // namespace

void register_spectral_norm(py::module& m) {
  m.def("power_iteration_", &power_iteration_,
        "Spectral-norm power iteration over a list of 2-D weights of one dtype, u and v in place; returns sigmas "
        "(CPU)",
        py::arg("weights"), py::arg("us"), py::arg("vs"), py::arg("n_power_iterations"), py::arg("eps"));
}

}  // namespace bindings
}  // namespace wk

// Bindings of the gradient-norm penalty's CPU kernels (csrc/cpu/penalty.cpp): penalty_forward and
// penalty_backward, with their argument checks.
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../wk_kernels.h"
#include "common.h"

namespace wk {
namespace bindings {
namespace {

// Refuses what the kernels cannot take; returns the kernels' element type of grads.
wk::DType check_penalty_input(const at::Tensor& grads) {
  TORCH_CHECK_VALUE(grads.device().is_cpu(), "grads: the extension's penalty kernel takes CPU tensors, got ",
                    grads.device());
  TORCH_CHECK_VALUE(grads.dim() >= 1 && grads.size(0) > 0, "grads: expected shape (B, ...) with B >= 1, got ",
                    grads.sizes());
  return kernel_dtype(grads, "grads", 0);
}

// Returns (weight * mean_i phi(n_i) as a 0-d tensor, norms (B,)), both float32 (float64 for
// float64 input).
std::tuple<at::Tensor, at::Tensor> penalty_forward(const at::Tensor& grads, double weight, double center, double p,
                                                   bool one_sided, double eps) {
  const wk::DType dtype = check_penalty_input(grads);
  const int64_t rows = grads.size(0);
  const at::Tensor g = grads.reshape({rows, -1}).contiguous();
  at::Tensor norms = at::empty({rows}, grads.options().dtype(acc_scalar_type(dtype)));
  const wk::PenaltySpec spec{weight, center, p, eps, one_sided};
  const double total = wk::cpu::penalty_forward(g.data_ptr(), rows, g.size(1), dtype, spec, norms.data_ptr());
  const bool f32 = norms.scalar_type() == at::kFloat;
  double mean = total / static_cast<double>(rows);
  if (f32 && total > static_cast<double>(std::numeric_limits<float>::max())) {
    mean = std::numeric_limits<double>::infinity();  // eager's float32 sum overflows: weight 0 then gives NaN too
  }
  double value = weight * mean;
  if (f32 && std::isfinite(value) &&
      std::abs(value) > static_cast<double>(std::numeric_limits<float>::max())) {
    value = std::copysign(std::numeric_limits<double>::infinity(), value);  // overflows to inf, as eager does
  }
  at::Tensor penalty = at::scalar_tensor(value, norms.options());
  return {penalty, norms};
}

// d penalty / d grads, times grad_output: a tensor shaped like grads.
at::Tensor penalty_backward(const at::Tensor& grads, const at::Tensor& norms, double grad_output, double weight,
                            double center, double p, bool one_sided, double eps) {
  const wk::DType dtype = check_penalty_input(grads);
  const at::ScalarType acc = acc_scalar_type(dtype);
  const int64_t rows = grads.size(0);
  const at::Tensor g = grads.reshape({rows, -1}).contiguous();
  TORCH_CHECK_VALUE(norms.dim() == 1 && norms.size(0) == rows && norms.scalar_type() == acc && norms.is_contiguous() &&
                        norms.device().is_cpu(),
                    "norms: expected a contiguous (", rows, ",) tensor of ", acc);
  at::Tensor out = at::empty_like(g);
  const wk::PenaltySpec spec{weight, center, p, eps, one_sided};
  wk::cpu::penalty_backward(g.data_ptr(), rows, g.size(1), dtype, spec, norms.data_ptr(),
                            grad_output * weight / static_cast<double>(rows), out.data_ptr());
  return out.view(grads.sizes());
}

}  // namespace

void register_penalty(py::module& m) {
  m.def("penalty_forward", &penalty_forward, "Fused per-sample norms and weight * mean phi(norm) (CPU)",
        py::arg("grads"), py::arg("weight"), py::arg("center"), py::arg("p"), py::arg("one_sided"), py::arg("eps"));
  m.def("penalty_backward", &penalty_backward, "Gradient of penalty_forward w.r.t. grads (CPU)", py::arg("grads"),
        py::arg("norms"), py::arg("grad_output"), py::arg("weight"), py::arg("center"), py::arg("p"),
        py::arg("one_sided"), py::arg("eps"));
}

}  // namespace bindings
}  // namespace wk

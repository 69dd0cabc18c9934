// What the binding files of wgan_kernels._C share: Python-style names for error messages, the
// torch dtype -> wk::DType mapping, the argument checks of in-place ops, borrowed tensor lists,
// and the register_<family> functions that module.cpp calls. The checks run once per tensor on
// the ops' fast paths, so they are inline here; what only error paths call is in common.cpp.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "../wk_kernels.h"

namespace wk {
namespace bindings {

// Messages name things as Python does (torch.float16, torch.sparse_coo, (3, 4), ndarray), so that
// the extension and the ops' Python checks (wgan_kernels/ops/*.py, wgan_kernels/_checks.py) refuse
// an argument with the same words. Called on error paths only (TORCH_CHECK formats lazily).
std::string py_name(at::ScalarType dtype);
std::string py_name(at::Layout layout);
std::string py_type_name(py::handle item);
std::string py_shape(at::IntArrayRef sizes);  // tuple(t.shape)

// The same words as wgan_kernels._checks.INFERENCE_TENSOR and SELF_OVERLAPPING.
inline constexpr const char* kInferenceTensor =
    "an inference tensor (created under torch.inference_mode()) cannot be updated in place outside inference "
    "mode; clone it first, or call this under torch.inference_mode()";
inline constexpr const char* kSelfOverlapping =
    "its elements share memory (an expanded view?) and it is updated in place; pass a tensor that owns its "
    "elements (e.g. .clone())";

// The kernels' element type for t's dtype; any other dtype is refused, naming arg[index].
inline wk::DType kernel_dtype(const at::Tensor& t, const char* arg, size_t index) {
  switch (t.scalar_type()) {
    case at::kFloat: return wk::DType::Float32;
    case at::kDouble: return wk::DType::Float64;
    case at::kHalf: return wk::DType::Float16;
    case at::kBFloat16: return wk::DType::BFloat16;
    default:
      TORCH_CHECK_VALUE(false, arg, "[", index, "]: expected a floating-point tensor (float32, float64, float16, "
                        "bfloat16), got ", py_name(t.scalar_type()));
  }
  return wk::DType::Float32;  // unreachable
}

// The dtype the kernels accumulate in for `dtype` (wk::acc_t in wk_traits.h): float32, or float64
// for Float64.
at::ScalarType acc_scalar_type(wk::DType dtype);

// torch refuses an in-place update of an inference tensor outside inference mode (inside it,
// allowed); a kernel writing through a pointer would not notice: refuse it here.
inline void check_not_inference(const at::Tensor& t, const char* arg, size_t index) {
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), arg, "[", index, "]: ", kInferenceTensor);
}

// In-place writes bypass autograd, as an optimizer step does. A tensor that is part of a graph
// (requires grad, not a leaf) would silently get wrong gradients: refuse it.
inline void check_writable(const at::Tensor& t, const char* arg, size_t index) {
  TORCH_CHECK_VALUE(t.defined(), arg, "[", index, "]: undefined tensor");
  TORCH_CHECK_VALUE(!(t.requires_grad() && !t.is_leaf()), arg, "[", index,
                    "]: an in-place update of a non-leaf tensor that requires grad would corrupt its "
                    "graph; pass leaf tensors (parameters) or detach first");
  check_not_inference(t, arg, index);
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, arg, "[", index, "]: expected a dense (strided) tensor, got ",
                    py_name(t.layout()));
}

// An expanded view (stride 0 over more than one element) written in place: a copy-back from a
// contiguous copy would write several results to one location (torch refuses it too).
inline void check_own_elements(const at::Tensor& t, const char* arg, size_t index) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, arg, "[", index, "]: ", kSelfOverlapping);
}

// After a kernel wrote t through a raw pointer, as torch's in-place ops do (an inference tensor
// has no version counter).
inline void bump_version(const at::Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

// The tensors of a Python list, borrowed from its items (valid while the list is alive): about
// 8 ns a tensor, where pybind11's std::vector<at::Tensor> caster takes 90 (CPU, 50 tensors). An
// item that is not a tensor is refused with its list's name and index.
class TensorList {
 public:
  TensorList(const py::list& items, const char* arg) {
    items_.reserve(items.size());
    for (const py::handle item : items) {
      TORCH_CHECK_VALUE(THPVariable_Check(item.ptr()), arg, "[", items_.size(), "]: expected a tensor, got ",
                        py_type_name(item));
      items_.push_back(&THPVariable_Unpack(item.ptr()));
    }
  }
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  const at::Tensor& operator[](size_t i) const { return *items_[i]; }

 private:
  std::vector<const at::Tensor*> items_;
};

// One per op family, each in its own file; module.cpp calls them.
void register_multi_tensor(py::module& m);
void register_penalty(py::module& m);
void register_spectral_norm(py::module& m);

}  // namespace bindings
}  // namespace wk

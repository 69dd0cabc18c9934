// The out-of-line half of common.h: Python's names for dtypes, layouts, types and shapes (error
// paths only) and the kernels' accumulation dtype.
#include "common.h"

#include <torch/csrc/DynamicTypes.h>

#include "../wk_traits.h"

namespace wk {
namespace bindings {
namespace {

std::string py_str(PyObject* obj) { return py::str(py::handle(obj)).cast<std::string>(); }

}  // namespace

std::string py_name(at::ScalarType dtype) { return py_str(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype))); }

std::string py_name(at::Layout layout) { return py_str(reinterpret_cast<PyObject*>(torch::getTHPLayout(layout))); }

std::string py_type_name(py::handle item) {
  return py::str(py::handle(reinterpret_cast<PyObject*>(Py_TYPE(item.ptr()))).attr("__name__")).cast<std::string>();
}

std::string py_shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

at::ScalarType acc_scalar_type(wk::DType dtype) {
  return wk::dispatch_dtype<at::Half, at::BFloat16>(dtype, [](auto tag) {
    using T = typename decltype(tag)::type;
    return c10::CppTypeToScalarType<wk::acc_t<T>>::value;
  });
}

}  // namespace bindings
}  // namespace wk

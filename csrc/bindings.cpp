// The one op registration file of wgan_kernels._C: argument checks, grouping by (device, dtype),
// and calls into the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels, which see raw pointers only.
#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#ifdef WGAN_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "wk_kernels.h"

namespace {

// Messages name things as Python does (torch.float16, torch.sparse_coo, (3, 4), ndarray), so that
// the extension and the ops' Python checks (wgan_kernels/ops/*.py, wgan_kernels/_checks.py) refuse
// an argument with the same words. Called on error paths only (TORCH_CHECK formats lazily).
std::string py_str(PyObject* obj) { return py::str(py::handle(obj)).cast<std::string>(); }
std::string py_name(at::ScalarType dtype) { return py_str(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype))); }
std::string py_name(at::Layout layout) { return py_str(reinterpret_cast<PyObject*>(torch::getTHPLayout(layout))); }
std::string py_type_name(py::handle item) {
  return py::str(py::handle(reinterpret_cast<PyObject*>(Py_TYPE(item.ptr()))).attr("__name__")).cast<std::string>();
}
std::string py_shape(at::IntArrayRef sizes) {  // tuple(t.shape)
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

// The same words as wgan_kernels._checks.INFERENCE_TENSOR and SELF_OVERLAPPING.
constexpr const char* kInferenceTensor =
    "an inference tensor (created under torch.inference_mode()) cannot be updated in place outside inference "
    "mode; clone it first, or call this under torch.inference_mode()";
constexpr const char* kSelfOverlapping =
    "its elements share memory (an expanded view?) and it is updated in place; pass a tensor that owns its "
    "elements (e.g. .clone())";

wk::DType kernel_dtype(const at::Tensor& t, const char* arg, size_t index) {
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

// torch refuses an in-place update of an inference tensor outside inference mode (inside it,
// allowed); a kernel writing through a pointer would not notice: refuse it here.
void check_not_inference(const at::Tensor& t, const char* arg, size_t index) {
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), arg, "[", index, "]: ", kInferenceTensor);
}

// In-place writes bypass autograd, as an optimizer step does. A tensor that is part of a graph
// (requires grad, not a leaf) would silently get wrong gradients: refuse it.
void check_writable(const at::Tensor& t, const char* arg, size_t index) {
  TORCH_CHECK_VALUE(t.defined(), arg, "[", index, "]: undefined tensor");
  TORCH_CHECK_VALUE(!(t.requires_grad() && !t.is_leaf()), arg, "[", index,
                    "]: an in-place update of a non-leaf tensor that requires grad would corrupt its "
                    "graph; pass leaf tensors (parameters) or detach first");
  check_not_inference(t, arg, index);
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, arg, "[", index, "]: expected a dense (strided) tensor, got ",
                    py_name(t.layout()));
}

// An expanded view (stride 0 over more than one element) written in place: the copy-back of the
// grouping path would write several results to one location (torch refuses it too).
void check_own_elements(const at::Tensor& t, const char* arg, size_t index) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, arg, "[", index, "]: ", kSelfOverlapping);
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

// Whether `t` joins the fast path of a list led by `first` (clip_, rmsprop_clip_): the same dtype
// and device, and one dense block of memory, so the kernel walks it as one span.
bool joins_fast_path(const at::Tensor& t, const at::Tensor& first) {
  return t.scalar_type() == first.scalar_type() && t.device() == first.device() && t.is_non_overlapping_and_dense();
}

void bump_version(const at::Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

// Tensors of one (device, dtype), as kernel spans. A tensor whose memory is not one dense
// block goes through a contiguous copy that is written back after the kernel.
struct Group {
  at::Device device;
  at::ScalarType dtype;
  std::vector<std::vector<at::Tensor>> originals;  // [k][i]: the k-th argument of item i
  std::vector<std::vector<at::Tensor>> work;       // the same, or a contiguous copy
};

Group& group_for(std::vector<Group>& groups, const at::Tensor& t, size_t arity) {
  for (auto& g : groups)
    if (g.device == t.device() && g.dtype == t.scalar_type()) return g;
  groups.push_back(Group{t.device(), t.scalar_type(), std::vector<std::vector<at::Tensor>>(arity),
                         std::vector<std::vector<at::Tensor>>(arity)});
  return groups.back();
}

// Adds one item (tensors that the kernel walks element by element together) to its group.
void add_item(std::vector<Group>& groups, const std::vector<at::Tensor>& item) {
  bool same_layout = item[0].is_non_overlapping_and_dense();
  for (size_t k = 1; k < item.size(); ++k) same_layout = same_layout && item[k].strides() == item[0].strides();
  Group& g = group_for(groups, item[0], item.size());
  for (size_t k = 0; k < item.size(); ++k) {
    g.originals[k].push_back(item[k]);
    g.work[k].push_back(same_layout ? item[k] : item[k].contiguous());
  }
}

std::vector<wk::Span> spans_of(const std::vector<at::Tensor>& ts) {
  std::vector<wk::Span> s;
  s.reserve(ts.size());
  for (const auto& t : ts) s.push_back(wk::Span{t.data_ptr(), t.numel()});
  return s;
}

void write_back(const Group& g, size_t k) {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < g.originals[k].size(); ++i)
    if (!g.work[k][i].is_same(g.originals[k][i])) g.originals[k][i].copy_(g.work[k][i]);
}

#ifdef WGAN_KERNELS_WITH_CUDA
void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "wgan_kernels: ", what, " CUDA launch failed: ", wk::cuda::error_string(err));
}
#endif

template <typename CpuFn, typename CudaFn>
void run_on(at::Device device, const CpuFn& on_cpu, const CudaFn& on_cuda) {
  if (device.is_cpu()) {
    on_cpu();
  } else if (device.is_cuda()) {
#ifdef WGAN_KERNELS_WITH_CUDA
    c10::cuda::CUDAGuard guard(device);
    on_cuda(static_cast<void*>(c10::cuda::getCurrentCUDAStream(device.index()).stream()));
#else
    (void)on_cuda;
    TORCH_CHECK(false, "wgan_kernels._C was built without its CUDA half; rebuild with CUDA to use CUDA tensors");
#endif
  } else {
    TORCH_CHECK_VALUE(false, "wgan_kernels: unsupported device ", device);
  }
}

void clip_(const py::list& param_list, double clip_value) {
  TORCH_CHECK_VALUE(std::isfinite(clip_value) && clip_value > 0, "clip_value: expected a finite number > 0, got ",
                    clip_value);
  const TensorList params(param_list, "params");
  if (params.empty()) return;
  auto launch = [&](at::Device device, const std::vector<wk::Span>& spans, wk::DType dtype) {
    const int n = static_cast<int>(spans.size());
    run_on(
        device, [&] { wk::cpu::clip_multi(spans.data(), n, dtype, clip_value); },
        [&](void* stream) {
#ifdef WGAN_KERNELS_WITH_CUDA
          check_cuda(wk::cuda::clip_multi(spans.data(), n, dtype, clip_value, stream), "clip_");
#endif
          (void)stream;
        });
  };
  // Fast path, the usual parameter list: every tensor dense, one device, one dtype. The spans
  // come straight from the arguments (no grouping, no tensor copies): with the borrowed list,
  // about 35 ns a tensor before the kernel, where the grouping path over pybind11's converted
  // list took about 200 (CPU, 50 Parameters).
  std::vector<wk::Span> spans;
  spans.reserve(params.size());
  check_writable(params[0], "params", 0);
  const wk::DType dtype = kernel_dtype(params[0], "params", 0);
  const at::Device device = params[0].device();
  bool uniform = true;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& t = params[i];
    check_writable(t, "params", i);
    kernel_dtype(t, "params", i);
    if (!joins_fast_path(t, params[0])) {
      check_own_elements(t, "params", i);
      uniform = false;  // finish the checks, then take the grouping path
      continue;
    }
    spans.push_back(wk::Span{t.data_ptr(), t.numel()});
  }
  if (uniform) {
    launch(device, spans, dtype);
    for (size_t i = 0; i < params.size(); ++i) bump_version(params[i]);
    return;
  }
  std::vector<Group> groups;
  for (size_t i = 0; i < params.size(); ++i) add_item(groups, {params[i]});
  for (const auto& g : groups) {
    launch(g.device, spans_of(g.work[0]), kernel_dtype(g.work[0][0], "params", 0));
    write_back(g, 0);
    for (const auto& t : g.originals[0]) bump_version(t);
  }
}

void rmsprop_clip_(const py::list& param_list, const py::list& grad_list, const py::list& square_avg_list,
                   const py::list& step_list, double lr, double alpha, double eps, double weight_decay,
                   std::optional<double> clip_value) {
  const TensorList params(param_list, "params"), grads(grad_list, "grads");
  const TensorList square_avgs(square_avg_list, "square_avgs"), steps(step_list, "steps");
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && square_avgs.size() == n && steps.size() == n,
                    "params, grads, square_avgs, steps: expected lists of equal length, got ", n, ", ", grads.size(),
                    ", ", square_avgs.size(), ", ", steps.size());
  if (clip_value)
    TORCH_CHECK_VALUE(std::isfinite(*clip_value) && *clip_value > 0, "clip_value: expected a finite number > 0, got ",
                      *clip_value);
  // Checks; on the way, the spans of the fast path (every triple dense with one layout, one
  // device and one dtype: the usual parameter list), as in clip_.
  std::vector<wk::Span> p_spans, g_spans, s_spans;
  p_spans.reserve(n), g_spans.reserve(n), s_spans.reserve(n);
  bool uniform = n > 0;
  // (The same checks, in the same order, as _check_rmsprop_items in wgan_kernels/ops/clip.py.)
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    check_writable(p, "params", i);
    kernel_dtype(p, "params", i);
    TORCH_CHECK_VALUE(g.defined() && g.layout() == at::kStrided, "grads[", i, "]: expected a dense gradient");
    for (const auto* t : {&g, &square_avgs[i]}) {
      TORCH_CHECK_VALUE(t->scalar_type() == p.scalar_type() && t->device() == p.device() && t->sizes() == p.sizes(),
                        t == &g ? "grads[" : "square_avgs[", i, "]: expected dtype ", py_name(p.scalar_type()),
                        ", device ", p.device(), " and shape ", py_shape(p.sizes()), " like params[", i, "], got ",
                        py_name(t->scalar_type()), ", ", t->device(), ", ", py_shape(t->sizes()));
    }
    check_writable(square_avgs[i], "square_avgs", i);
    check_not_inference(steps[i], "steps", i);
    check_own_elements(p, "params", i);
    check_own_elements(square_avgs[i], "square_avgs", i);
    uniform = uniform && joins_fast_path(p, params[0]) && g.strides() == p.strides() &&
              square_avgs[i].strides() == p.strides();
    if (uniform) {
      p_spans.push_back(wk::Span{p.data_ptr(), p.numel()});
      g_spans.push_back(wk::Span{g.data_ptr(), p.numel()});
      s_spans.push_back(wk::Span{square_avgs[i].data_ptr(), p.numel()});
    }
  }
  const wk::RMSpropParams hp{lr, alpha, eps, weight_decay, clip_value.value_or(0.0), clip_value.has_value()};
  auto launch = [&](at::Device device, const wk::Span* p, const wk::Span* gr, const wk::Span* s, int m,
                    wk::DType dtype) {
    run_on(
        device, [&] { wk::cpu::rmsprop_clip_multi(p, gr, s, m, dtype, hp); },
        [&](void* stream) {
#ifdef WGAN_KERNELS_WITH_CUDA
          check_cuda(wk::cuda::rmsprop_clip_multi(p, gr, s, m, dtype, hp, stream), "rmsprop_clip_");
#endif
          (void)stream;
        });
  };
  if (uniform) {
    launch(params[0].device(), p_spans.data(), g_spans.data(), s_spans.data(), static_cast<int>(n),
           kernel_dtype(params[0], "params", 0));
    for (size_t i = 0; i < n; ++i) bump_version(params[i]), bump_version(square_avgs[i]);
  } else {
    std::vector<Group> groups;
    for (size_t i = 0; i < n; ++i) add_item(groups, {params[i], grads[i], square_avgs[i]});
    for (const auto& g : groups) {
      const auto p = spans_of(g.work[0]), gr = spans_of(g.work[1]), s = spans_of(g.work[2]);
      launch(g.device, p.data(), gr.data(), s.data(), static_cast<int>(p.size()), kernel_dtype(g.work[0][0], "params", 0));
      write_back(g, 0);
      write_back(g, 2);
      for (const auto& t : g.originals[0]) bump_version(t);
      for (const auto& t : g.originals[2]) bump_version(t);
    }
  }
  // Step counters: torch keeps them as float32 CPU scalars; bump them here, no kernel launch each.
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& st = steps[i];
    if (st.device().is_cpu() && st.scalar_type() == at::kFloat && st.numel() == 1) {
      *st.data_ptr<float>() += 1.0f;
      bump_version(st);
    } else {
      at::NoGradGuard no_grad;
      st.add_(1);
    }
  }
}

// ---------------------------------------------------------------- gradient-norm penalty (CPU)

void check_penalty_input(const at::Tensor& grads) {
  TORCH_CHECK_VALUE(grads.device().is_cpu(), "grads: the extension's penalty kernel takes CPU tensors, got ",
                    grads.device());
  TORCH_CHECK_VALUE(grads.dim() >= 1 && grads.size(0) > 0, "grads: expected shape (B, ...) with B >= 1, got ",
                    grads.sizes());
  kernel_dtype(grads, "grads", 0);
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Returns (weight * mean_i phi(n_i) as a 0-d tensor, norms (B,)), both float32 (float64 for
// float64 input).
std::tuple<at::Tensor, at::Tensor> penalty_forward(const at::Tensor& grads, double weight, double center, double p,
                                                   bool one_sided, double eps) {
  check_penalty_input(grads);
  const int64_t rows = grads.size(0);
  const at::Tensor g = grads.reshape({rows, -1}).contiguous();
  at::Tensor norms = at::empty({rows}, grads.options().dtype(acc_type(grads)));
  const wk::PenaltySpec spec{weight, center, p, eps, one_sided};
  const double total =
      wk::cpu::penalty_forward(g.data_ptr(), rows, g.size(1), kernel_dtype(g, "grads", 0), spec, norms.data_ptr());
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
  check_penalty_input(grads);
  const int64_t rows = grads.size(0);
  const at::Tensor g = grads.reshape({rows, -1}).contiguous();
  TORCH_CHECK_VALUE(norms.dim() == 1 && norms.size(0) == rows && norms.scalar_type() == acc_type(grads) &&
                        norms.is_contiguous() && norms.device().is_cpu(),
                    "norms: expected a contiguous (", rows, ",) tensor of ", acc_type(grads));
  at::Tensor out = at::empty_like(g);
  const wk::PenaltySpec spec{weight, center, p, eps, one_sided};
  wk::cpu::penalty_backward(g.data_ptr(), rows, g.size(1), kernel_dtype(g, "grads", 0), spec, norms.data_ptr(),
                            grad_output * weight / static_cast<double>(rows), out.data_ptr());
  return out.view(grads.sizes());
}

// ---------------------------------------------------------------- spectral norm (CPU)

// Updates us[i], vs[i] in place; returns the sigmas (float64, one per weight). Weights of one
// dtype go through the kernel together (one parallel region per iteration).
at::Tensor power_iteration_(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& us,
                            const std::vector<at::Tensor>& vs, int64_t n_power_iterations, double eps) {
  TORCH_CHECK_VALUE(us.size() == weights.size() && vs.size() == weights.size(),
                    "weights, us, vs: expected lists of equal length, got ", weights.size(), ", ", us.size(), ", ",
                    vs.size());
  TORCH_CHECK_VALUE(n_power_iterations >= 1, "n_power_iterations: expected an int >= 1, got ", n_power_iterations);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps: expected a finite number > 0, got ", eps);
  const size_t n = weights.size();
  std::vector<at::Tensor> dense(n);  // W as it is when contiguous, else a contiguous copy
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK_VALUE(w.dim() == 2 && w.device().is_cpu(), "weights[", i, "]: expected a 2-D CPU tensor, got ",
                      w.dim(), "-D on ", w.device());
    kernel_dtype(w, "weights", i);
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
  }
  at::Tensor sigmas = at::empty({static_cast<int64_t>(n)}, at::kDouble);
  double* out = sigmas.data_ptr<double>();
  std::vector<bool> done(n, false);
  for (size_t i = 0; i < n; ++i) {  // one kernel call per dtype
    if (done[i]) continue;
    std::vector<size_t> idx;
    std::vector<wk::cpu::Matrix> mats;
    for (size_t j = i; j < n; ++j) {
      if (done[j] || weights[j].scalar_type() != weights[i].scalar_type()) continue;
      done[j] = true;
      idx.push_back(j);
      mats.push_back(wk::cpu::Matrix{dense[j].data_ptr(), dense[j].size(0), dense[j].size(1), us[j].data_ptr(),
                                vs[j].data_ptr()});
    }
    std::vector<double> sig(mats.size());
    wk::cpu::power_iteration(mats.data(), static_cast<int>(mats.size()), kernel_dtype(weights[i], "weights", i),
                             static_cast<int>(n_power_iterations), eps, sig.data());
    for (size_t k = 0; k < idx.size(); ++k) out[idx[k]] = sig[k];
  }
  for (size_t i = 0; i < n; ++i) {
    bump_version(us[i]);
    bump_version(vs[i]);
  }
  return sigmas;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wgan_kernels compiled kernels (CPU always; CUDA when built with it)";
#ifdef WGAN_KERNELS_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.def("clip_", &clip_, "Clamp every tensor to [-clip_value, clip_value] in place, one launch per (device, dtype)",
        py::arg("params"), py::arg("clip_value"));
  m.def("rmsprop_clip_", &rmsprop_clip_, "Fused RMSprop step + clamp over lists of tensors", py::arg("params"),
        py::arg("grads"), py::arg("square_avgs"), py::arg("steps"), py::arg("lr"), py::arg("alpha"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("clip_value"));
  m.def("penalty_forward", &penalty_forward, "Fused per-sample norms and weight * mean phi(norm) (CPU)",
        py::arg("grads"), py::arg("weight"), py::arg("center"), py::arg("p"), py::arg("one_sided"), py::arg("eps"));
  m.def("penalty_backward", &penalty_backward, "Gradient of penalty_forward w.r.t. grads (CPU)", py::arg("grads"),
        py::arg("norms"), py::arg("grad_output"), py::arg("weight"), py::arg("center"), py::arg("p"),
        py::arg("one_sided"), py::arg("eps"));
  m.def("power_iteration_", &power_iteration_,
        "Spectral-norm power iteration over a list of 2-D weights, u and v in place; returns sigmas (CPU)",
        py::arg("weights"), py::arg("us"), py::arg("vs"), py::arg("n_power_iterations"), py::arg("eps"));
}

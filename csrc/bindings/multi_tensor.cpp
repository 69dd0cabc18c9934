// Bindings of the multi-tensor ops clip_ and rmsprop_clip_ (kernels: csrc/cpu/multi_tensor.cpp,
// csrc/cuda/multi_tensor.cu): argument checks, the fast path over a uniform list, the grouping of
// any other list by (device, dtype), and the launch on the tensors' device.
#include <torch/extension.h>

#ifdef WGAN_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <optional>
#include <vector>

#include "../wk_kernels.h"
#include "common.h"

namespace wk {
namespace bindings {
namespace {

// Whether `t` joins the fast path of a list led by `first` (clip_, rmsprop_clip_): the same dtype
// and device, and one dense block of memory, so the kernel walks it as one span.
bool joins_fast_path(const at::Tensor& t, const at::Tensor& first) {
  return t.scalar_type() == first.scalar_type() && t.device() == first.device() && t.is_non_overlapping_and_dense();
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
// A kernel's return code (a cudaError_t) as a RuntimeError naming the op.
void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "wgan_kernels: ", what, " CUDA launch failed: ", wk::cuda::error_string(err));
}
#endif

// on_cpu() for a CPU device; for a CUDA device, on_cuda(its current stream) with the device current.
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

}  // namespace

void register_multi_tensor(py::module& m) {
  m.def("clip_", &clip_, "Clamp every tensor to [-clip_value, clip_value] in place, one launch per (device, dtype)",
        py::arg("params"), py::arg("clip_value"));
  m.def("rmsprop_clip_", &rmsprop_clip_, "Fused RMSprop step + clamp over lists of tensors", py::arg("params"),
        py::arg("grads"), py::arg("square_avgs"), py::arg("steps"), py::arg("lr"), py::arg("alpha"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("clip_value"));
}

}  // namespace bindings
}  // namespace wk

// Plain C++ interface between the bindings (csrc/bindings/, which see torch) and the kernels
// (csrc/cpu/*.cpp, csrc/cuda/*.cu, which see only raw pointers). Keeping torch headers out of the
// .cu files is what keeps nvcc fast. The type rules they share are in wk_traits.h.
#pragma once
#include <cstdint>

namespace wk {

// Element types the kernels handle; the bindings map torch dtypes onto these.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// One flat, dense tensor as the kernels see it: a base pointer and an element count.
struct Span {
  void* ptr;
  int64_t numel;
};

// RMSprop hyper-parameters shared by the CPU and CUDA kernels.
struct RMSpropParams {
  double lr, alpha, eps, weight_decay, clip_value;
  bool clip;  // clamp the updated parameter to [-clip_value, clip_value]
};

// Gradient-norm penalty phi(n) = |n - center|^p, or max(0, n - center)^p when one_sided.
struct PenaltySpec {
  double weight, center, p, eps;
  bool one_sided;
};

namespace cpu {
// Clamp every span of `spans` to [-c, c] in place: one parallel loop over all of them. c (> 0) is
// rounded to the dtype as torch converts a double scalar (through float for the 16-bit types);
// beyond the dtype's range it is inf: no clipping (a NaN stays NaN either way).
void clip_multi(const Span* spans, int n, DType dtype, double c);
// Fused RMSprop + clamp over n (param, grad, square_avg) triples of equal numel: the operations,
// fused multiply-adds and (16-bit) roundings of torch.optim.RMSprop on torch's vectorised CPU
// path. hp.lr, hp.eps and hp.weight_decay within float's range (ClippedRMSprop checks them).
void rmsprop_clip_multi(const Span* params, const Span* grads, const Span* square_avgs, int n,
                        DType dtype, const RMSpropParams& hp);
// Per-row L2 norms of a row-major (rows x cols) matrix g, written to `norms` (float32, or
// float64 for Float64 input); returns sum_i phi(norm_i), accumulated in double.
double penalty_forward(const void* g, int64_t rows, int64_t cols, DType dtype, const PenaltySpec& spec, void* norms);
// grad_in[i, :] = scale * phi'(n_i) / n_i * g[i, :] (the safe form documented in ops/penalty.py),
// grad_in of g's dtype; `scale` is grad_output * weight / rows.
void penalty_backward(const void* g, int64_t rows, int64_t cols, DType dtype, const PenaltySpec& spec,
                      const void* norms, double scale, void* grad_in);
// Spectral-norm power iteration for n row-major (rows_i x cols_i) matrices W_i, as
// torch.nn.utils.parametrizations.spectral_norm does it: `iterations` times { u = normalize(W v);
// v = normalize(W^T u) }, normalize(x) = x / max(||x||, eps); u_i (rows_i) and v_i (cols_i) are
// updated in place (same dtype as W). One pass over W per iteration gives both W v and W^T (W v);
// sigma_i = u . W v_new is written to sigmas[i] as ||W^T u||^2 / max(||W^T u||, eps), the same
// value without another pass. All matrices share one parallel region per iteration. Accumulates
// in float32 (float64 for Float64).
struct Matrix {
  const void* w;
  int64_t rows, cols;
  void* u;
  void* v;
};
void power_iteration(const Matrix* mats, int n, DType dtype, int iterations, double eps, double* sigmas);
}  // namespace cpu

namespace cuda {
// Same contracts on device pointers, except that rmsprop_clip_multi follows torch.optim.RMSprop's
// CUDA path (its foreach ops' roundings and fused multiply-adds); launched on `stream` (a
// cudaStream_t). Return a cudaError_t value (0 on success).
int clip_multi(const Span* spans, int n, DType dtype, double c, void* stream);
int rmsprop_clip_multi(const Span* params, const Span* grads, const Span* square_avgs, int n,
                       DType dtype, const RMSpropParams& hp, void* stream);
const char* error_string(int err);
}  // namespace cuda

}  // namespace wk

// Plain C++ interface between the bindings (csrc/bindings.cpp, which sees torch) and the
// kernels (csrc/cpu/*.cpp, csrc/cuda/*.cu, which see only raw pointers). Keeping torch headers
// out of the .cu files is what keeps nvcc fast.
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

namespace cpu {
// Clamp every span of `spans` to [-c, c] in place: one parallel loop over all of them.
void clip_multi(const Span* spans, int n, DType dtype, double c);
// Fused RMSprop + clamp over n (param, grad, square_avg) triples of equal numel.
void rmsprop_clip_multi(const Span* params, const Span* grads, const Span* square_avgs, int n,
                        DType dtype, const RMSpropParams& hp);
}  // namespace cpu

namespace cuda {
// Same contracts on device pointers; launched on `stream` (a cudaStream_t).
// Return a cudaError_t value (0 on success).
int clip_multi(const Span* spans, int n, DType dtype, double c, void* stream);
int rmsprop_clip_multi(const Span* params, const Span* grads, const Span* square_avgs, int n,
                       DType dtype, const RMSpropParams& hp, void* stream);
const char* error_string(int err);
}  // namespace cuda

}  // namespace wk

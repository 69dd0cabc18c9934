// CUDA multi-tensor kernels: weight clipping and fused RMSprop + clipping.
// No torch headers here (they make nvcc slow): the bindings pass raw pointers and a stream.
// The tensor table travels by value as a kernel argument (apex's multi_tensor_apply idea):
// up to kMaxTensors tensors per launch, no host-to-device copy; each block finds its tensor by
// binary search over the cumulative block counts and processes one chunk of it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "../wk_kernels.h"

namespace wk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 4;                                  // elements in flight per thread
constexpr int64_t kChunk = int64_t(kThreads) * kIlp * 4;  // elements per block
constexpr int kMaxTensors = 96;                           // keeps the argument under 4 KB

template <int kPtrs>
struct Table {
  void* ptr[kPtrs][kMaxTensors];
  int64_t numel[kMaxTensors];
  int block_start[kMaxTensors + 1];
  int n;
};

template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename OpMath<T>::type load(const T* p) { return *p; }
template <> __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <typename T> __device__ __forceinline__ T from_op(typename OpMath<T>::type x) { return x; }
template <> __device__ __forceinline__ __half from_op(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_op(float x) { return __float2bfloat16_rn(x); }

// Host-side rounding of a double to storage type T (for the clamp bounds).
template <typename T> T round_to(double x) { return static_cast<T>(x); }
template <> __half round_to<__half>(double x) { return __float2half_rn(static_cast<float>(x)); }
template <> __nv_bfloat16 round_to<__nv_bfloat16>(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
template <typename T> typename OpMath<T>::type widen(T x) { return static_cast<typename OpMath<T>::type>(x); }
template <> float widen<__half>(__half x) { return __half2float(x); }
template <> float widen<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Op>
__device__ __forceinline__ Op clamp_value(Op x, Op lo, Op hi) {
  x = x < lo ? lo : x;  // a NaN compares false and passes through, as in torch.clamp
  return hi < x ? hi : x;
}

template <int kPtrs>
__device__ __forceinline__ int find_tensor(const Table<kPtrs>& t, int block) {
  int lo = 0, hi = t.n - 1;
  while (lo < hi) {  // last i with block_start[i] <= block
    const int mid = (lo + hi + 1) / 2;
    if (t.block_start[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__global__ void clip_kernel(const Table<1> t, typename OpMath<T>::type lo,
                            typename OpMath<T>::type hi) {
  const int i = find_tensor(t, blockIdx.x);
  T* p = static_cast<T*>(t.ptr[0][i]);
  const int64_t begin = int64_t(blockIdx.x - t.block_start[i]) * kChunk;
  const int64_t end = begin + kChunk < t.numel[i] ? begin + kChunk : t.numel[i];
  for (int64_t base = begin + threadIdx.x; base < end; base += int64_t(kThreads) * kIlp) {
    typename OpMath<T>::type v[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t j = base + int64_t(k) * kThreads;
      if (j < end) v[k] = load(p + j);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t j = base + int64_t(k) * kThreads;
      if (j < end) p[j] = from_op<T>(clamp_value(v[k], lo, hi));
    }
  }
}

template <typename T>
__global__ void rmsprop_kernel(const Table<3> t, RMSpropParams hp) {
  using Op = typename OpMath<T>::type;
  const int i = find_tensor(t, blockIdx.x);
  T* p = static_cast<T*>(t.ptr[0][i]);
  const T* g = static_cast<const T*>(t.ptr[1][i]);
  T* s = static_cast<T*>(t.ptr[2][i]);
  const Op lr = Op(hp.lr), alpha = Op(hp.alpha), oma = Op(1.0 - hp.alpha), eps = Op(hp.eps);
  const Op wd = Op(hp.weight_decay);
  const T hi_t = from_op<T>(Op(hp.clip_value));
  const Op hi = load(&hi_t);
  const Op lo = -hi;
  const int64_t begin = int64_t(blockIdx.x - t.block_start[i]) * kChunk;
  const int64_t end = begin + kChunk < t.numel[i] ? begin + kChunk : t.numel[i];
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    Op x = load(p + j), gk = load(g + j);
    if (wd != Op(0)) gk = gk + wd * x;
    const T sk = from_op<T>(load(s + j) * alpha + oma * gk * gk);
    const Op avg = sqrt(load(&sk)) + eps;
    x = x - lr * gk / avg;
    if (hp.clip) x = clamp_value(x, lo, hi);
    s[j] = sk;
    p[j] = from_op<T>(x);
  }
}

// Splits spans into launches of at most kMaxTensors non-empty tensors and calls
// launch(table, blocks) for each.
template <int kPtrs, typename Launch>
int for_each_launch(const Span* const* spans, int n, const Launch& launch) {
  Table<kPtrs> t;
  t.n = 0;
  int blocks = 0;
  auto flush = [&]() -> int {
    if (t.n == 0) return 0;
    t.block_start[t.n] = blocks;
    launch(t, blocks);
    const int err = static_cast<int>(cudaGetLastError());
    t.n = 0;
    blocks = 0;
    return err;
  };
  for (int i = 0; i < n; ++i) {
    const int64_t numel = spans[0][i].numel;
    if (numel == 0) continue;
    const int64_t need = (numel + kChunk - 1) / kChunk;
    if (t.n == kMaxTensors || int64_t(blocks) + need > int64_t(1) << 30) {
      if (int err = flush()) return err;
    }
    for (int k = 0; k < kPtrs; ++k) t.ptr[k][t.n] = spans[k][i].ptr;
    t.numel[t.n] = numel;
    t.block_start[t.n] = blocks;
    blocks += static_cast<int>(need);
    ++t.n;
  }
  return flush();
}

template <typename T>
int clip_typed(const Span* spans, int n, double c, cudaStream_t stream) {
  using Op = typename OpMath<T>::type;
  // Bounds rounded to the storage type first, as the CPU kernel does.
  const Op hi = widen(round_to<T>(c)), lo = widen(round_to<T>(-c));
  const Span* lists[1] = {spans};
  return for_each_launch<1>(lists, n, [&](const Table<1>& t, int blocks) {
    clip_kernel<T><<<blocks, kThreads, 0, stream>>>(t, lo, hi);
  });
}

template <typename T>
int rmsprop_typed(const Span* p, const Span* g, const Span* s, int n, const RMSpropParams& hp,
                  cudaStream_t stream) {
  const Span* lists[3] = {p, g, s};
  return for_each_launch<3>(lists, n, [&](const Table<3>& t, int blocks) {
    rmsprop_kernel<T><<<blocks, kThreads, 0, stream>>>(t, hp);
  });
}

}  // namespace

int clip_multi(const Span* spans, int n, DType dtype, double c, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32: return clip_typed<float>(spans, n, c, st);
    case DType::Float64: return clip_typed<double>(spans, n, c, st);
    case DType::Float16: return clip_typed<__half>(spans, n, c, st);
    case DType::BFloat16: return clip_typed<__nv_bfloat16>(spans, n, c, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int rmsprop_clip_multi(const Span* params, const Span* grads, const Span* square_avgs, int n, DType dtype,
                       const RMSpropParams& hp, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32: return rmsprop_typed<float>(params, grads, square_avgs, n, hp, st);
    case DType::Float64: return rmsprop_typed<double>(params, grads, square_avgs, n, hp, st);
    case DType::Float16: return rmsprop_typed<__half>(params, grads, square_avgs, n, hp, st);
    case DType::BFloat16: return rmsprop_typed<__nv_bfloat16>(params, grads, square_avgs, n, hp, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace cuda
}  // namespace wk

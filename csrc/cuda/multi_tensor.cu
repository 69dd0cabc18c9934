// CUDA multi-tensor kernels: weight clipping and fused RMSprop + clipping.
// No torch headers here (they make nvcc slow): the bindings pass raw pointers and a stream.
// The tensor table travels by value as a kernel argument (apex's multi_tensor_apply idea):
// up to kMaxTensors tensors per launch, no host-to-device copy; each block finds its tensor by
// binary search over the cumulative block counts and processes one chunk of it, kIlp elements in
// flight per thread (for_each_element, shared by both kernels).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../wk_kernels.h"
#include "../wk_traits.h"

namespace wk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 4;                                   // elements in flight per thread
constexpr int64_t kChunk = int64_t(kThreads) * kIlp * 4;  // elements per block (a multiple of kIlp)
constexpr int kMaxTensors = 96;                           // keeps the argument under 4 KB

template <int kPtrs>
struct Table {
  void* ptr[kPtrs][kMaxTensors];
  int64_t numel[kMaxTensors];
  int block_start[kMaxTensors + 1];
  int n;
};

// Storage type T to its arithmetic type acc_t<T> and back (round to nearest even). Intrinsics for
// the 16-bit types: torch's nvcc flags turn off their conversion operators.
template <typename T> __host__ __device__ __forceinline__ acc_t<T> widen(T x) { return x; }
template <> __host__ __device__ __forceinline__ float widen(__half x) { return __half2float(x); }
template <> __host__ __device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __host__ __device__ __forceinline__ T narrow(acc_t<T> x) { return x; }
template <> __host__ __device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T, where torch stores an intermediate tensor of T (a no-op for float and double).
template <typename T> __device__ __forceinline__ acc_t<T> rounded(acc_t<T> x) { return widen(narrow<T>(x)); }

// A clip bound in T, rounded as the CPU kernel rounds it (as torch converts a double scalar).
template <typename T> acc_t<T> bound_in(double c) {
  if constexpr (std::is_same_v<T, double>) {
    return c;
  } else {
    return widen(narrow<T>(float_of(c)));
  }
}

template <typename Acc>
__device__ __forceinline__ Acc clamp_value(Acc x, Acc lo, Acc hi) {
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

// kIlp consecutive elements, moved by one load or store.
template <typename T>
struct alignas(sizeof(T) * kIlp) Vec {
  T x[kIlp];
};

// Calls f(v) for every element of this block's chunk, v[a] (acc_t<T>) the element of array a of
// the chunk's tensor; f updates v in place and arrays 0 .. kWritten-1 get v back, rounded to T
// (the others are only read). When every array of the tensor is aligned to kIlp elements, each
// thread moves kIlp elements of an array with one vector load (chunks start at multiples of kIlp)
// and the last chunk's final (numel mod kIlp) elements go one per thread; otherwise each thread
// loads kIlp elements kThreads apart, coalesced across the block.
template <typename T, int kPtrs, int kWritten, typename F>
__device__ __forceinline__ void for_each_element(const Table<kPtrs>& t, const F& f) {
  using Acc = acc_t<T>;
  const int i = find_tensor(t, blockIdx.x);
  T* ptr[kPtrs];
  bool aligned = true;
#pragma unroll
  for (int a = 0; a < kPtrs; ++a) {
    ptr[a] = static_cast<T*>(t.ptr[a][i]);
    aligned = aligned && reinterpret_cast<uintptr_t>(ptr[a]) % sizeof(Vec<T>) == 0;
  }
  const int64_t begin = int64_t(blockIdx.x - t.block_start[i]) * kChunk;
  const int64_t end = begin + kChunk < t.numel[i] ? begin + kChunk : t.numel[i];
  if (aligned) {
    const int64_t vec_end = begin + (end - begin) / kIlp * kIlp;
    for (int64_t j = begin + int64_t(threadIdx.x) * kIlp; j < vec_end; j += int64_t(kThreads) * kIlp) {
      Vec<T> r[kPtrs];
#pragma unroll
      for (int a = 0; a < kPtrs; ++a) r[a] = *reinterpret_cast<const Vec<T>*>(ptr[a] + j);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        Acc v[kPtrs];
#pragma unroll
        for (int a = 0; a < kPtrs; ++a) v[a] = widen(r[a].x[k]);
        f(v);
#pragma unroll
        for (int a = 0; a < kWritten; ++a) r[a].x[k] = narrow<T>(v[a]);
      }
#pragma unroll
      for (int a = 0; a < kWritten; ++a) *reinterpret_cast<Vec<T>*>(ptr[a] + j) = r[a];
    }
    const int64_t j = vec_end + threadIdx.x;
    if (j < end) {
      Acc v[kPtrs];
#pragma unroll
      for (int a = 0; a < kPtrs; ++a) v[a] = widen(ptr[a][j]);
      f(v);
#pragma unroll
      for (int a = 0; a < kWritten; ++a) ptr[a][j] = narrow<T>(v[a]);
    }
  } else {
    for (int64_t base = begin + threadIdx.x; base < end; base += int64_t(kThreads) * kIlp) {
      Acc v[kIlp][kPtrs];
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t j = base + int64_t(k) * kThreads;
        if (j < end) {
#pragma unroll
          for (int a = 0; a < kPtrs; ++a) v[k][a] = widen(ptr[a][j]);
        }
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t j = base + int64_t(k) * kThreads;
        if (j < end) {
          f(v[k]);
#pragma unroll
          for (int a = 0; a < kWritten; ++a) ptr[a][j] = narrow<T>(v[k][a]);
        }
      }
    }
  }
}

// The bounds are values of T, so clamping before the store's rounding equals clamping after it.
template <typename T>
__global__ void clip_kernel(const Table<1> t, acc_t<T> lo, acc_t<T> hi) {
  for_each_element<T, 1, 1>(t, [=](acc_t<T>(&v)[1]) { v[0] = clamp_value(v[0], lo, hi); });
}

// RMSprop's hyper-parameters in the arithmetic type, converted once on the host.
template <typename Acc>
struct RMSpropArgs {
  Acc lr, alpha, one_minus_alpha, eps, weight_decay, lo, hi;
  bool decay, clip;
};

// Arrays: 0 param, 1 square_avg (both updated), 2 grad. The steps of torch.optim.RMSprop's
// default CUDA path (foreach, no momentum, not centered), each computed in acc_t<T> and rounded
// to T where that foreach op stores its result:
//   g = g + wd p            _foreach_add: torch's g + wd * p, which nvcc contracts to fma(wd, p, g)
//   s = s alpha             _foreach_mul_
//   s = s + (1 - alpha) g g _foreach_addcmul_: fma((1 - alpha), g g, s), fma(g, g, s) when 1 - alpha is 1
//   d = sqrt(s)             _foreach_sqrt
//   d = d + eps             _foreach_add_
//   p = p - lr g / d        _foreach_addcdiv_: fma(-lr, g / d, p)
// then the clamp, before p's rounding (see clip_kernel). Unrounded, a float16 denominator
// 0 + 1e-8 gave finite steps where torch's (rounded to 0) gives inf.
template <typename T>
__global__ void rmsprop_kernel(const Table<3> t, const RMSpropArgs<acc_t<T>> h) {
  using Acc = acc_t<T>;
  for_each_element<T, 3, 2>(t, [=](Acc(&v)[3]) {
    Acc p = v[0], s = v[1], g = v[2];
    if (h.decay) g = rounded<T>(std::fma(h.weight_decay, p, g));
    s = rounded<T>(s * h.alpha);
    s = rounded<T>(h.one_minus_alpha == Acc(1) ? std::fma(g, g, s) : std::fma(h.one_minus_alpha, g * g, s));
    const Acc d = rounded<T>(rounded<T>(std::sqrt(s)) + h.eps);
    p = std::fma(-h.lr, g / d, p);
    if (h.clip) p = clamp_value(p, h.lo, h.hi);
    v[0] = p;
    v[1] = s;
  });
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
  const acc_t<T> hi = bound_in<T>(c), lo = bound_in<T>(-c);
  const Span* lists[1] = {spans};
  return for_each_launch<1>(lists, n, [&](const Table<1>& t, int blocks) {
    clip_kernel<T><<<blocks, kThreads, 0, stream>>>(t, lo, hi);
  });
}

template <typename T>
int rmsprop_typed(const Span* p, const Span* g, const Span* s, int n, const RMSpropParams& hp,
                  cudaStream_t stream) {
  using Acc = acc_t<T>;
  const RMSpropArgs<Acc> h{Acc(hp.lr), Acc(hp.alpha), Acc(1.0 - hp.alpha), Acc(hp.eps), Acc(hp.weight_decay),
                           bound_in<T>(-hp.clip_value), bound_in<T>(hp.clip_value), hp.weight_decay != 0.0, hp.clip};
  const Span* lists[3] = {p, s, g};
  return for_each_launch<3>(lists, n, [&](const Table<3>& t, int blocks) {
    rmsprop_kernel<T><<<blocks, kThreads, 0, stream>>>(t, h);
  });
}

}  // namespace

int clip_multi(const Span* spans, int n, DType dtype, double c, void* stream) {
  return dispatch_dtype<__half, __nv_bfloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return clip_typed<T>(spans, n, c, static_cast<cudaStream_t>(stream));
  });
}

int rmsprop_clip_multi(const Span* params, const Span* grads, const Span* square_avgs, int n, DType dtype,
                       const RMSpropParams& hp, void* stream) {
  return dispatch_dtype<__half, __nv_bfloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return rmsprop_typed<T>(params, grads, square_avgs, n, hp, static_cast<cudaStream_t>(stream));
  });
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace cuda
}  // namespace wk

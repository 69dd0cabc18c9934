// Type rules shared by the kernels (csrc/cpu/*.cpp, csrc/cuda/*.cu) and the bindings: the type
// each storage type computes in, the one switch from wk::DType to a typed call, and torch's
// conversion of a double scalar to float. Plain C++, no torch or CUDA headers: the .cu includes it.
#pragma once
#include <cmath>
#include <cstdlib>
#include <limits>

#include "wk_kernels.h"

namespace wk {

// The type kernels compute and accumulate in for storage type T (torch's opmath_type): double
// for double, float for float and for the 16-bit types, whichever library defines them.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename T> struct TypeTag { using type = T; };

// f(TypeTag<T>{}) with T the storage type of `dtype`; returns what f returns. Half and BFloat16
// are the caller's 16-bit types: c10::Half and c10::BFloat16 in C++, __half and __nv_bfloat16 in
// the .cu (torch's nvcc flags turn off their conversions to and from c10's). In f:
// `using T = typename decltype(tag)::type;`.
template <typename Half, typename BFloat16, typename F>
auto dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::Float32: return f(TypeTag<float>{});
    case DType::Float64: return f(TypeTag<double>{});
    case DType::Float16: return f(TypeTag<Half>{});
    case DType::BFloat16: return f(TypeTag<BFloat16>{});
  }
  std::abort();  // not reached: every DType comes from the bindings' kernel_dtype, which makes only these
}

// A double scalar as float, as torch converts one: rounded to nearest, +-inf beyond float's
// range. A static_cast is undefined there; IEEE rounding sends FLT_MAX + half an ulp
// (2^128 - 2^103) and beyond to inf, so that is written out. (NaN stays NaN.)
inline float float_of(double x) {
  constexpr double kFloatOverflow = 0x1.ffffffp+127;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  if (std::fabs(x) >= kFloatOverflow) return x > 0 ? kInf : -kInf;
  return static_cast<float>(x);
}

}  // namespace wk

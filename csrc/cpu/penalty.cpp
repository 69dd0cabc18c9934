// CPU gradient-norm penalty: the forward (per-sample norms and the penalty sum) in one pass over
// the input gradient, the backward (a per-row scale times the row) in one pass. Accumulation is
// in float32 (float64 for float64 input), whatever the storage type.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>

#include "../wk_kernels.h"

namespace wk {
namespace cpu {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

double phi(double n, const PenaltySpec& s) {
  double d = n - s.center;
  if (s.one_sided) d = d < 0 ? 0.0 : d;  // (not d > 0 ? d : 0, which would turn a NaN norm into 0)
  else d = std::fabs(d);
  return s.p == 2.0 ? d * d : std::pow(d, s.p);
}

// phi'(n) / n, finite everywhere: with center 0 and p >= 2 it is p * n^(p-2) (exact, also at
// n = 0); otherwise phi'(n) / max(n, eps).
double scale_of(double n, const PenaltySpec& s) {
  if (s.center == 0.0 && s.p >= 2.0) return s.p == 2.0 ? 2.0 : s.p * std::pow(n, s.p - 2.0);
  double d = n - s.center, dphi;
  if (s.one_sided) dphi = d < 0 ? 0.0 : s.p * std::pow(d, s.p - 1.0);  // NaN stays NaN; pow(0, p-1) = 0
  else dphi = (d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0)) * s.p * std::pow(std::fabs(d), s.p - 1.0);
  return dphi / (n > s.eps ? n : s.eps);
}

template <typename T>
double forward_typed(const T* g, int64_t rows, int64_t cols, const PenaltySpec& spec, typename Acc<T>::type* norms) {
  using A = typename Acc<T>::type;
  // Rows in parallel; a row is summed in 8 lanes so the compiler vectorises the reduction.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = g + r * cols;
      A lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= cols; k += 8)
        for (int l = 0; l < 8; ++l) {
          const A x = static_cast<A>(row[k + l]);
          lanes[l] += x * x;
        }
      A sum = 0;
      for (; k < cols; ++k) {
        const A x = static_cast<A>(row[k]);
        sum += x * x;
      }
      for (int l = 0; l < 8; ++l) sum += lanes[l];
      norms[r] = std::sqrt(sum);
    }
  });
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) total += phi(static_cast<double>(norms[r]), spec);
  return total;
}

template <typename T>
void backward_typed(const T* g, int64_t rows, int64_t cols, const PenaltySpec& spec,
                    const typename Acc<T>::type* norms, double scale, T* out) {
  using A = typename Acc<T>::type;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const A c = static_cast<A>(scale * scale_of(static_cast<double>(norms[r]), spec));
      const T* __restrict__ src = g + r * cols;
      T* __restrict__ dst = out + r * cols;
      for (int64_t k = 0; k < cols; ++k) dst[k] = static_cast<T>(c * static_cast<A>(src[k]));
    }
  });
}

}  // namespace

double penalty_forward(const void* g, int64_t rows, int64_t cols, DType dtype, const PenaltySpec& spec, void* norms) {
  switch (dtype) {
    case DType::Float32: return forward_typed(static_cast<const float*>(g), rows, cols, spec, static_cast<float*>(norms));
    case DType::Float64:
      return forward_typed(static_cast<const double*>(g), rows, cols, spec, static_cast<double*>(norms));
    case DType::Float16:
      return forward_typed(static_cast<const c10::Half*>(g), rows, cols, spec, static_cast<float*>(norms));
    case DType::BFloat16:
      return forward_typed(static_cast<const c10::BFloat16*>(g), rows, cols, spec, static_cast<float*>(norms));
  }
  return 0;
}

void penalty_backward(const void* g, int64_t rows, int64_t cols, DType dtype, const PenaltySpec& spec,
                      const void* norms, double scale, void* grad_in) {
  switch (dtype) {
    case DType::Float32:
      return backward_typed(static_cast<const float*>(g), rows, cols, spec, static_cast<const float*>(norms), scale,
                            static_cast<float*>(grad_in));
    case DType::Float64:
      return backward_typed(static_cast<const double*>(g), rows, cols, spec, static_cast<const double*>(norms), scale,
                            static_cast<double*>(grad_in));
    case DType::Float16:
      return backward_typed(static_cast<const c10::Half*>(g), rows, cols, spec, static_cast<const float*>(norms),
                            scale, static_cast<c10::Half*>(grad_in));
    case DType::BFloat16:
      return backward_typed(static_cast<const c10::BFloat16*>(g), rows, cols, spec, static_cast<const float*>(norms),
                            scale, static_cast<c10::BFloat16*>(grad_in));
  }
}

}  // namespace cpu
}  // namespace wk

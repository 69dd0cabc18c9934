// CPU gradient-norm penalty: the forward (per-sample norms and the penalty sum) in one pass over
// the input gradient, the backward (a per-row scale times the row) in one pass. Accumulation is
// in float32 (float64 for float64 input), whatever the storage type.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>

#include "../wk_kernels.h"
#include "../wk_traits.h"

namespace wk {
namespace cpu {
namespace {

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
double forward_typed(const T* g, int64_t rows, int64_t cols, const PenaltySpec& spec, acc_t<T>* norms) {
  using A = acc_t<T>;
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
                    const acc_t<T>* norms, double scale, T* out) {
  using A = acc_t<T>;
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
  return dispatch_dtype<c10::Half, c10::BFloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return forward_typed(static_cast<const T*>(g), rows, cols, spec, static_cast<acc_t<T>*>(norms));
  });
}

void penalty_backward(const void* g, int64_t rows, int64_t cols, DType dtype, const PenaltySpec& spec,
                      const void* norms, double scale, void* grad_in) {
  dispatch_dtype<c10::Half, c10::BFloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    backward_typed(static_cast<const T*>(g), rows, cols, spec, static_cast<const acc_t<T>*>(norms), scale,
                   static_cast<T*>(grad_in));
  });
}

}  // namespace cpu
}  // namespace wk

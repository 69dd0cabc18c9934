// CPU spectral-norm power iteration: one pass over W per iteration (W v and W^T W v together,
// row by row while the row is in cache), the rows split among threads with per-thread partial
// sums of W^T t. See wk_kernels.h for the contract.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../wk_kernels.h"

namespace wk {
namespace cpu {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Dot product in 16 independent lanes: a float reduction GCC vectorises without -ffast-math.
template <typename T, typename A>
inline A dot_lanes(const T* __restrict__ a, const A* __restrict__ b, int64_t n) {
  constexpr int kLanes = 16;
  A lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<A>(a[j + l]) * b[j + l];
  A sum = 0;
  for (; j < n; ++j) sum += static_cast<A>(a[j]) * b[j];
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

template <typename A>
A norm_of(const std::vector<A>& x) {
  A s = 0;
  for (A e : x) s += e * e;
  return std::sqrt(s);
}

template <typename T>
double power_iteration_typed(const T* w, int64_t rows, int64_t cols, T* u_out, T* v_io, int iterations, double eps) {
  using A = typename Acc<T>::type;
  const A e = static_cast<A>(eps);
  std::vector<A> v(cols), t(rows), s(cols);
  for (int64_t j = 0; j < cols; ++j) v[j] = static_cast<A>(v_io[j]);
  const int threads = at::get_num_threads();
  std::vector<std::vector<A>> partial(threads, std::vector<A>(cols));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(cols, 1));
  A w_norm = 0;
  for (int it = 0; it < iterations; ++it) {
    for (auto& p : partial) std::fill(p.begin(), p.end(), A(0));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      A* __restrict__ acc = partial[at::get_thread_num()].data();
      const A* __restrict__ vv = v.data();
      for (int64_t i = r0; i < r1; ++i) {
        const T* __restrict__ row = w + i * cols;
        const A dot = dot_lanes(row, vv, cols);
        t[i] = dot;
        for (int64_t j = 0; j < cols; ++j) acc[j] += dot * static_cast<A>(row[j]);
      }
    });
    std::fill(s.begin(), s.end(), A(0));
    for (const auto& p : partial)
      for (int64_t j = 0; j < cols; ++j) s[j] += p[j];
    // u = normalize(W v); W^T u = s / max(||t||, eps); v = normalize(W^T u)
    const A c = std::max(norm_of(t), e);
    for (int64_t i = 0; i < rows; ++i) t[i] /= c;  // t is now u
    for (int64_t j = 0; j < cols; ++j) s[j] /= c;  // s is now W^T u
    w_norm = norm_of(s);
    const A d = std::max(w_norm, e);
    for (int64_t j = 0; j < cols; ++j) v[j] = s[j] / d;
  }
  for (int64_t i = 0; i < rows; ++i) u_out[i] = static_cast<T>(t[i]);
  for (int64_t j = 0; j < cols; ++j) v_io[j] = static_cast<T>(v[j]);
  // sigma = u . W v = (W^T u) . v = ||W^T u||^2 / max(||W^T u||, eps)
  return static_cast<double>(w_norm) * static_cast<double>(w_norm) / std::max<double>(w_norm, eps);
}

}  // namespace

double power_iteration(const void* w, int64_t rows, int64_t cols, DType dtype, void* u, void* v, int iterations,
                       double eps) {
  switch (dtype) {
    case DType::Float32:
      return power_iteration_typed(static_cast<const float*>(w), rows, cols, static_cast<float*>(u),
                                   static_cast<float*>(v), iterations, eps);
    case DType::Float64:
      return power_iteration_typed(static_cast<const double*>(w), rows, cols, static_cast<double*>(u),
                                   static_cast<double*>(v), iterations, eps);
    case DType::Float16:
      return power_iteration_typed(static_cast<const c10::Half*>(w), rows, cols, static_cast<c10::Half*>(u),
                                   static_cast<c10::Half*>(v), iterations, eps);
    case DType::BFloat16:
      return power_iteration_typed(static_cast<const c10::BFloat16*>(w), rows, cols, static_cast<c10::BFloat16*>(u),
                                   static_cast<c10::BFloat16*>(v), iterations, eps);
  }
  return 0;
}

}  // namespace cpu
}  // namespace wk

// CPU spectral-norm power iteration over a list of matrices. Each iteration is one parallel
// region over row blocks of all matrices (tasks of ~64K values): a task computes t = W v for its
// rows and, while the rows are in cache, its partial W^T t (four rows at a time). A short serial step per matrix then
// sums the partials and normalises u and v. See wk_kernels.h for the contract.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../wk_kernels.h"
#include "../wk_traits.h"

namespace wk {
namespace cpu {
namespace {

constexpr int64_t kTaskValues = int64_t(1) << 16;

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

// Four rows at once: their dot products with b share each load of b (4 x 16 independent lanes,
// enough to keep the FMA units busy), and acc += d0 r0 + d1 r1 + d2 r2 + d3 r3 then loads and
// stores acc once per four rows. The rows are read twice, the second time from L1/L2.
template <typename T, typename A>
inline void dot4_lanes(const T* __restrict__ r0, const T* __restrict__ r1, const T* __restrict__ r2,
                       const T* __restrict__ r3, const A* __restrict__ b, int64_t n, A* out) {
  constexpr int kLanes = 16;
  A l0[kLanes] = {}, l1[kLanes] = {}, l2[kLanes] = {}, l3[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A x = b[j + l];
      l0[l] += static_cast<A>(r0[j + l]) * x;
      l1[l] += static_cast<A>(r1[j + l]) * x;
      l2[l] += static_cast<A>(r2[j + l]) * x;
      l3[l] += static_cast<A>(r3[j + l]) * x;
    }
  }
  A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (; j < n; ++j) {
    const A x = b[j];
    s0 += static_cast<A>(r0[j]) * x;
    s1 += static_cast<A>(r1[j]) * x;
    s2 += static_cast<A>(r2[j]) * x;
    s3 += static_cast<A>(r3[j]) * x;
  }
  for (int l = 0; l < kLanes; ++l) {
    s0 += l0[l];
    s1 += l1[l];
    s2 += l2[l];
    s3 += l3[l];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// Rows [r0, r1) of W (cols wide): t_i = W_i . v for each row, and acc += sum_i t_i W_i.
template <typename T, typename A>
void rows_dot_axpy(const T* w, int64_t cols, int64_t r0, int64_t r1, const A* __restrict__ v,
                   A* __restrict__ t, A* __restrict__ acc) {
  int64_t i = r0;
  for (; i + 4 <= r1; i += 4) {
    const T* __restrict__ a = w + i * cols;
    const T* __restrict__ b = a + cols;
    const T* __restrict__ c = b + cols;
    const T* __restrict__ d = c + cols;
    A dots[4];
    dot4_lanes(a, b, c, d, v, cols, dots);
    for (int k = 0; k < 4; ++k) t[i + k] = dots[k];
    const A d0 = dots[0], d1 = dots[1], d2 = dots[2], d3 = dots[3];
    for (int64_t j = 0; j < cols; ++j)
      acc[j] += d0 * static_cast<A>(a[j]) + d1 * static_cast<A>(b[j]) + d2 * static_cast<A>(c[j]) +
                d3 * static_cast<A>(d[j]);
  }
  for (; i < r1; ++i) {
    const T* __restrict__ row = w + i * cols;
    const A dot = dot_lanes(row, v, cols);
    t[i] = dot;
    for (int64_t j = 0; j < cols; ++j) acc[j] += dot * static_cast<A>(row[j]);
  }
}

template <typename A>
A norm_of(const A* x, int64_t n) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return std::sqrt(s);
}

struct Task {
  int mat;
  int64_t r0, r1;
  int64_t partial;  // offset of this task's W^T t partial (cols values) in the partial buffer
};

template <typename T>
void power_iteration_typed(const Matrix* mats, int n, int iterations, double eps, double* sigmas) {
  using A = acc_t<T>;
  const A e = static_cast<A>(eps);
  std::vector<std::vector<A>> v(n), t(n), s(n);
  std::vector<Task> tasks;
  std::vector<std::vector<int>> tasks_of(n);
  int64_t partial_size = 0;
  for (int k = 0; k < n; ++k) {
    const Matrix& m = mats[k];
    v[k].resize(m.cols);
    t[k].resize(m.rows);
    s[k].resize(m.cols);
    const T* vin = static_cast<const T*>(m.v);
    for (int64_t j = 0; j < m.cols; ++j) v[k][j] = static_cast<A>(vin[j]);
    const int64_t pieces = std::clamp<int64_t>(m.rows * m.cols / kTaskValues, 1, m.rows);
    for (int64_t p = 0; p < pieces; ++p) {
      tasks_of[k].push_back(static_cast<int>(tasks.size()));
      tasks.push_back(Task{k, m.rows * p / pieces, m.rows * (p + 1) / pieces, partial_size});
      partial_size += m.cols;
    }
  }
  std::vector<A> partial(partial_size);
  std::vector<A> w_norm(n, A(0));
  for (int it = 0; it < iterations; ++it) {
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t b, int64_t e_) {
      for (int64_t q = b; q < e_; ++q) {
        const Task& task = tasks[q];
        const Matrix& m = mats[task.mat];
        const T* w = static_cast<const T*>(m.w);
        const A* __restrict__ vv = v[task.mat].data();
        A* __restrict__ acc = partial.data() + task.partial;
        A* __restrict__ tt = t[task.mat].data();
        std::fill(acc, acc + m.cols, A(0));
        rows_dot_axpy(w, m.cols, task.r0, task.r1, vv, tt, acc);
      }
    });
    for (int k = 0; k < n; ++k) {
      const Matrix& m = mats[k];
      A* sk = s[k].data();
      std::fill(sk, sk + m.cols, A(0));
      for (int q : tasks_of[k]) {
        const A* p = partial.data() + tasks[q].partial;
        for (int64_t j = 0; j < m.cols; ++j) sk[j] += p[j];
      }
      // u = normalize(W v); W^T u = s / max(||t||, eps); v = normalize(W^T u)
      const A c = std::max(norm_of(t[k].data(), m.rows), e);
      for (int64_t i = 0; i < m.rows; ++i) t[k][i] /= c;  // t is now u
      for (int64_t j = 0; j < m.cols; ++j) sk[j] /= c;    // s is now W^T u
      w_norm[k] = norm_of(sk, m.cols);
      const A d = std::max(w_norm[k], e);
      for (int64_t j = 0; j < m.cols; ++j) v[k][j] = sk[j] / d;
    }
  }
  for (int k = 0; k < n; ++k) {
    const Matrix& m = mats[k];
    T* u_out = static_cast<T*>(m.u);
    T* v_out = static_cast<T*>(m.v);
    for (int64_t i = 0; i < m.rows; ++i) u_out[i] = static_cast<T>(t[k][i]);
    for (int64_t j = 0; j < m.cols; ++j) v_out[j] = static_cast<T>(v[k][j]);
    // sigma = u . W v = (W^T u) . v = ||W^T u||^2 / max(||W^T u||, eps)
    const double wn = static_cast<double>(w_norm[k]);
    sigmas[k] = wn * wn / std::max(wn, eps);
  }
}

}  // namespace

void power_iteration(const Matrix* mats, int n, DType dtype, int iterations, double eps, double* sigmas) {
  dispatch_dtype<c10::Half, c10::BFloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    power_iteration_typed<T>(mats, n, iterations, eps, sigmas);
  });
}

}  // namespace cpu
}  // namespace wk

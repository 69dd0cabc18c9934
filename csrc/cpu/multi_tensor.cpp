// CPU multi-tensor kernels: weight clipping and fused RMSprop + clipping.
// All spans are processed by one at::parallel_for, as if they were one flat array, so many
// small tensors cost one fork/join instead of one per tensor. The loops are plain scalar code
// written so that GCC vectorises them (-O3 -fno-math-errno).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../wk_kernels.h"
#include "../wk_traits.h"

namespace wk {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per task; below this the loop runs inline

// Calls f(i, begin, end) for every piece [begin, end) of span i, the pieces of all spans
// split among threads as one flat range. A task boundary that falls inside a span is moved up to
// a multiple of `align` elements from the span's start (64 bytes: torch's CPU allocations are
// 64-byte aligned), so no thread walks a span with every vector load straddling two cache lines:
// unaligned, the second thread's half of the DCGAN-64 critic made clip_ 1.4x slower (AMD EPYC).
template <typename F>
void for_each_piece(const Span* spans, int n, int64_t align, const F& f) {
  std::vector<int64_t> offsets(n + 1, 0);
  for (int i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + spans[i].numel;
  auto span_of = [&](int64_t x) {  // the span that holds flat index x (x < offsets[n])
    return static_cast<int>(std::upper_bound(offsets.begin(), offsets.end(), x) - offsets.begin()) - 1;
  };
  auto aligned = [&](int64_t x) {  // the same function of x for the task it ends and the one it starts
    if (x == 0 || x == offsets[n]) return x;
    const int i = span_of(x);
    return offsets[i] + std::min((x - offsets[i] + align - 1) / align * align, spans[i].numel);
  };
  at::parallel_for(0, offsets[n], kGrain, [&](int64_t begin, int64_t end) {
    begin = aligned(begin);
    end = aligned(end);
    if (begin >= end) return;
    int i = span_of(begin);
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[i + 1]);
      if (stop > begin) f(i, begin - offsets[i], stop - offsets[i]);
      begin = std::max(begin, stop);
      ++i;
    }
  });
}

// A clip bound in the storage type T, rounded as torch converts a double scalar (through float for
// the 16-bit types): +-inf beyond T's range, i.e. no clipping (float16 with c = 1e5).
template <typename T>
T bound_in(double c) {
  if constexpr (std::is_same_v<T, double>) {
    return c;
  } else {
    return static_cast<T>(float_of(c));
  }
}

// NaN-propagating clamp (torch.clamp semantics): a NaN compares false and passes through.
template <typename Op>
inline Op clamp_value(Op x, Op lo, Op hi) {
  x = x < lo ? lo : x;
  return hi < x ? hi : x;
}

// One contiguous piece with the bounds as by-value locals: a store through p cannot alias them
// (as it could the lambda's by-reference captures), so GCC vectorises the loop.
template <typename T, typename Op>
void clip_piece(T* __restrict__ p, int64_t n, const Op lo, const Op hi) {
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<T>(clamp_value(static_cast<Op>(p[k]), lo, hi));
}

template <typename T>
void clip_typed(const Span* spans, int n, double c) {
  using Op = acc_t<T>;
  // Bounds rounded to the storage type first, so results equal a clamp done in T.
  const Op hi = static_cast<Op>(bound_in<T>(c));
  const Op lo = static_cast<Op>(bound_in<T>(-c));
  for_each_piece(spans, n, 64 / sizeof(T), [&](int i, int64_t b, int64_t e) {
    clip_piece<T, Op>(static_cast<T*>(spans[i].ptr) + b, e - b, lo, hi);
  });
}

// x rounded to the storage type T, where torch's step rounds an intermediate tensor (a no-op for
// float and double).
template <typename T, typename Op>
inline Op rounded(Op x) {
  return static_cast<Op>(static_cast<T>(x));
}

// a * b + c rounded once, as torch's vectorised kernels compute it, where the target has an FMA
// instruction (-march=native on any x86-64 CPU since 2013, every aarch64). Without one (a
// WGAN_KERNELS_PORTABLE build), rounded twice: a libm fma call per element would stop GCC
// vectorising the loop.
template <typename Op>
inline Op mul_add(Op a, Op b, Op c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// One contiguous piece: plain pointers and loop-invariant constants, so GCC vectorises it
// (sqrt and division included, -fno-math-errno).
template <typename T, typename Op, bool kClip, bool kDecay>
void rmsprop_piece(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s, int64_t n, Op lr, Op alpha,
                   Op one_minus_alpha, Op eps, Op wd, Op lo, Op hi) {
#pragma GCC ivdep
  for (int64_t k = 0; k < n; ++k) {
    Op x = static_cast<Op>(p[k]);
    Op gk = static_cast<Op>(g[k]);
    // The operations of torch.optim.RMSprop as torch's vectorised CPU kernels do them (float32 and
    // float64 give torch's square_avg bit for bit): g = g.add(p, alpha=wd) is fma(wd, p, g);
    // square_avg.mul_(alpha).addcmul_(g, g, 1 - alpha) is fma((1 - alpha) g, g, alpha square_avg);
    // p.addcdiv_(g, square_avg.sqrt().add_(eps), -lr) is p + (-lr g) / denominator (torch's sqrt
    // is not always correctly rounded: p may differ by an ulp). Float16/bfloat16 intermediates are
    // rounded where torch's are: unrounded, a float16 denominator 0 + 1e-8 gave finite steps where
    // torch's (rounded to 0) gives inf. (torch's own scalar and vectorised paths differ at ties.)
    if (kDecay) gk = rounded<T>(mul_add(wd, x, gk));
    const T sk = static_cast<T>(mul_add(one_minus_alpha * gk, gk, rounded<T>(static_cast<Op>(s[k]) * alpha)));
    const Op avg = rounded<T>(rounded<T>(std::sqrt(static_cast<Op>(sk))) + eps);
    x = x + (-lr) * gk / avg;
    if (kClip) x = clamp_value(x, lo, hi);
    s[k] = sk;
    p[k] = static_cast<T>(x);
  }
}

template <typename T, bool kClip, bool kDecay>
void rmsprop_typed(const Span* params, const Span* grads, const Span* sqs, int n, const RMSpropParams& hp) {
  using Op = acc_t<T>;
  const Op lr = static_cast<Op>(hp.lr), alpha = static_cast<Op>(hp.alpha);
  const Op one_minus_alpha = static_cast<Op>(1.0 - hp.alpha), eps = static_cast<Op>(hp.eps);
  const Op wd = static_cast<Op>(hp.weight_decay);
  const Op hi = static_cast<Op>(bound_in<T>(hp.clip_value));
  const Op lo = static_cast<Op>(bound_in<T>(-hp.clip_value));
  for_each_piece(params, n, 64 / sizeof(T), [&](int i, int64_t b, int64_t e) {
    rmsprop_piece<T, Op, kClip, kDecay>(static_cast<T*>(params[i].ptr) + b, static_cast<const T*>(grads[i].ptr) + b,
                                        static_cast<T*>(sqs[i].ptr) + b, e - b, lr, alpha, one_minus_alpha, eps, wd,
                                        lo, hi);
  });
}

template <typename T>
void rmsprop_dispatch(const Span* params, const Span* grads, const Span* sqs, int n, const RMSpropParams& hp) {
  const bool decay = hp.weight_decay != 0.0;
  if (hp.clip && decay) rmsprop_typed<T, true, true>(params, grads, sqs, n, hp);
  else if (hp.clip) rmsprop_typed<T, true, false>(params, grads, sqs, n, hp);
  else if (decay) rmsprop_typed<T, false, true>(params, grads, sqs, n, hp);
  else rmsprop_typed<T, false, false>(params, grads, sqs, n, hp);
}

}  // namespace

void clip_multi(const Span* spans, int n, DType dtype, double c) {
  dispatch_dtype<c10::Half, c10::BFloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    clip_typed<T>(spans, n, c);
  });
}

void rmsprop_clip_multi(const Span* params, const Span* grads, const Span* square_avgs, int n, DType dtype,
                        const RMSpropParams& hp) {
  dispatch_dtype<c10::Half, c10::BFloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rmsprop_dispatch<T>(params, grads, square_avgs, n, hp);
  });
}

}  // namespace cpu
}  // namespace wk

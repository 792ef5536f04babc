// Fused AdaBound/AMSBound step for CPU tensors: one pass per element over p, g, m, v (, vmax).
//
// Deliberately free of torch headers so it compiles in about a second: Python passes raw data
// pointers, element counts and the per-tensor scalars from dynabound.bounds.step_coefficients.
// The element-wise math mirrors dynabound.functional._single_tensor_adabound operation by
// operation (no FMA contraction: -ffp-contract=off), in float for float/bfloat16/float16
// storage and in double for double storage.
//
// Vectorisation: the loop is plain C++ that GCC/Clang vectorise at -O3. On x86-64 a second
// copy is compiled for AVX2+F16C and picked at run time, so the shared object is portable
// between machines that share an extension cache (no -march=native).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__GNUC__)
#define DB_INLINE inline __attribute__((always_inline))
#else
#define DB_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define DB_X86_DISPATCH 1
#define DB_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define DB_X86_DISPATCH 0
#endif

#if defined(__FLT16_MAX__)
#define DB_HAS_FLOAT16 1
#else
#define DB_HAS_FLOAT16 0
#endif

namespace {

struct BFloat16 {
  uint16_t bits;
};

template <typename S>
struct Io {
  using Math = S;
  static DB_INLINE Math load(S x) { return x; }
  static DB_INLINE S store(Math x) { return x; }
};

template <>
struct Io<BFloat16> {
  using Math = float;
  static DB_INLINE float load(BFloat16 x) {
    uint32_t u = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  // Round to nearest even, NaN to the canonical quiet NaN: the same as c10::BFloat16.
  static DB_INLINE BFloat16 store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return BFloat16{static_cast<uint16_t>(f != f ? 0x7FC0u : rounded)};
  }
};

#if DB_HAS_FLOAT16
template <>
struct Io<_Float16> {
  using Math = float;
  static DB_INLINE float load(_Float16 x) { return static_cast<float>(x); }
  static DB_INLINE _Float16 store(float x) { return static_cast<_Float16>(x); }
};
#endif

// Scalars of one tensor's update, already converted to the math type.
template <typename T>
struct Scalars {
  T beta1, one_minus_beta1, beta2, one_minus_beta2;
  T eps, weight_decay, decay, sign, grad_scale, box_lo, box_hi;
  T numerator, lower, upper, rate_scale;
};

enum WeightDecay { kNoDecay = 0, kCoupled = 1, kDecoupled = 2 };

// rate = clamp(numerator / (sqrt(u) + eps), lower, upper) * lr * scale;  p -= rate * m.
// The comparisons are written so that NaN propagates, as torch.clamp/maximum do.
template <typename S, int WD, bool AMS, bool UNSCALE>
DB_INLINE void update_elements(S* __restrict p, S* __restrict g, S* __restrict m, S* __restrict v,
                           S* __restrict vmax, int64_t n, const Scalars<typename Io<S>::Math>& k) {
  using T = typename Io<S>::Math;
  for (int64_t i = 0; i < n; ++i) {
    T grad = Io<S>::load(g[i]);
    if (UNSCALE) {
      grad = grad / k.grad_scale;
      g[i] = Io<S>::store(grad);  // like torch's fused Adam: gradients are left unscaled
    }
    grad = grad * k.sign;
    T param = Io<S>::load(p[i]);
    if (WD == kCoupled) grad = grad + k.weight_decay * param;
    if (WD == kDecoupled) param = param * k.decay;
    T avg = Io<S>::load(m[i]) * k.beta1 + k.one_minus_beta1 * grad;
    T avg_sq = Io<S>::load(v[i]) * k.beta2 + k.one_minus_beta2 * grad * grad;
    T second = avg_sq;
    if (AMS) {
      T running = Io<S>::load(vmax[i]);
      running = (running < avg_sq || avg_sq != avg_sq) ? avg_sq : running;
      vmax[i] = Io<S>::store(running);
      second = running;
    }
    T rate = (T(1) / (std::sqrt(second) + k.eps)) * k.numerator;
    rate = rate < k.lower ? k.lower : rate;
    rate = rate > k.upper ? k.upper : rate;
    rate = rate * k.rate_scale;
    param = param - rate * avg;
    param = param < k.box_lo ? k.box_lo : param;
    param = param > k.box_hi ? k.box_hi : param;
    p[i] = Io<S>::store(param);
    m[i] = Io<S>::store(avg);
    v[i] = Io<S>::store(avg_sq);
  }
}

// Cache lines prefetched ahead of the one being updated. One core cannot keep enough
// misses in flight from the hardware prefetcher alone while the sqrt/div chain fills the
// reorder buffer; prefetching 2 KB ahead made a 1-thread step 5-10% faster (64 MB tensors).
constexpr int64_t kPrefetchLines = 32;

// The update, one cache line of elements at a time, prefetching each stream ahead.
template <typename S, int WD, bool AMS, bool UNSCALE>
DB_INLINE void update_body(S* __restrict p, S* __restrict g, S* __restrict m, S* __restrict v,
                           S* __restrict vmax, int64_t n, const Scalars<typename Io<S>::Math>& k) {
  constexpr int64_t line = 64 / sizeof(S);
  constexpr int64_t ahead = kPrefetchLines * line;
  int64_t i = 0;
  for (; i + line <= n; i += line) {
#if defined(__GNUC__)
    __builtin_prefetch(g + i + ahead, 0);
    __builtin_prefetch(p + i + ahead, 1);
    __builtin_prefetch(m + i + ahead, 1);
    __builtin_prefetch(v + i + ahead, 1);
    if (AMS) __builtin_prefetch(vmax + i + ahead, 1);
#endif
    update_elements<S, WD, AMS, UNSCALE>(p + i, g + i, m + i, v + i, AMS ? vmax + i : vmax, line,
                                         k);
  }
  update_elements<S, WD, AMS, UNSCALE>(p + i, g + i, m + i, v + i, AMS ? vmax + i : vmax, n - i,
                                       k);
}

template <typename S, int WD, bool AMS, bool UNSCALE>
void update_generic(S* p, S* g, S* m, S* v, S* vmax, int64_t n,
                    const Scalars<typename Io<S>::Math>& k) {
  update_body<S, WD, AMS, UNSCALE>(p, g, m, v, vmax, n, k);
}

#if DB_X86_DISPATCH
template <typename S, int WD, bool AMS, bool UNSCALE>
DB_TARGET_AVX2 void update_avx2(S* p, S* g, S* m, S* v, S* vmax, int64_t n,
                                const Scalars<typename Io<S>::Math>& k) {
  update_body<S, WD, AMS, UNSCALE>(p, g, m, v, vmax, n, k);
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

template <typename S>
using UpdateFn = void (*)(S*, S*, S*, S*, S*, int64_t, const Scalars<typename Io<S>::Math>&);

template <typename S, int WD, bool AMS, bool UNSCALE>
UpdateFn<S> pick_isa(bool avx2) {
#if DB_X86_DISPATCH
  if (avx2) return &update_avx2<S, WD, AMS, UNSCALE>;
#endif
  (void)avx2;
  return &update_generic<S, WD, AMS, UNSCALE>;
}

template <typename S, int WD>
UpdateFn<S> pick_flags(bool ams, bool unscale, bool avx2) {
  if (ams) {
    return unscale ? pick_isa<S, WD, true, true>(avx2) : pick_isa<S, WD, true, false>(avx2);
  }
  return unscale ? pick_isa<S, WD, false, true>(avx2) : pick_isa<S, WD, false, false>(avx2);
}

// Layout of the `hyper` array passed from Python (keep in sync with cpu.py).
enum Hyper {
  kBeta1, kBeta2, kEps, kWeightDecay, kDecay, kSign, kGradScale, kBoxLo, kBoxHi, kNumHyper
};
// Layout of the per-tensor `coef` rows.
enum Coef { kNumerator, kLower, kUpper, kRateScale, kNumCoef };

template <typename S>
int run(int64_t n_tensors, void* const* ptrs, const int64_t* numels, const double* coef,
        const double* hyper, int weight_decay_mode, int amsbound, int unscale, int num_threads,
        int64_t chunk) {
  using T = typename Io<S>::Math;
  bool avx2 = false;
#if DB_X86_DISPATCH
  avx2 = cpu_has_avx2();
#endif
  UpdateFn<S> fn;
  switch (weight_decay_mode) {
    case kNoDecay: fn = pick_flags<S, kNoDecay>(amsbound, unscale, avx2); break;
    case kCoupled: fn = pick_flags<S, kCoupled>(amsbound, unscale, avx2); break;
    case kDecoupled: fn = pick_flags<S, kDecoupled>(amsbound, unscale, avx2); break;
    default: return 2;
  }

  Scalars<T> base;
  base.beta1 = static_cast<T>(hyper[kBeta1]);
  base.one_minus_beta1 = static_cast<T>(1.0 - hyper[kBeta1]);
  base.beta2 = static_cast<T>(hyper[kBeta2]);
  base.one_minus_beta2 = static_cast<T>(1.0 - hyper[kBeta2]);
  base.eps = static_cast<T>(hyper[kEps]);
  base.weight_decay = static_cast<T>(hyper[kWeightDecay]);
  base.decay = static_cast<T>(hyper[kDecay]);
  base.sign = static_cast<T>(hyper[kSign]);
  base.grad_scale = static_cast<T>(hyper[kGradScale]);
  base.box_lo = static_cast<T>(hyper[kBoxLo]);
  base.box_hi = static_cast<T>(hyper[kBoxHi]);

  // Work unit w covers elements [w*chunk, (w+1)*chunk) of all tensors laid end to end, so
  // many small tensors share a unit and the units have equal cost.
  std::vector<Scalars<T>> scalars(n_tensors, base);
  std::vector<int64_t> offsets(n_tensors + 1, 0);
  for (int64_t t = 0; t < n_tensors; ++t) {
    const double* c = coef + t * kNumCoef;
    scalars[t].numerator = static_cast<T>(c[kNumerator]);
    scalars[t].lower = static_cast<T>(c[kLower]);
    scalars[t].upper = static_cast<T>(c[kUpper]);
    scalars[t].rate_scale = static_cast<T>(c[kRateScale]);
    offsets[t + 1] = offsets[t] + numels[t];
  }
  const int64_t total = offsets[n_tensors];
  const int64_t n_work = (total + chunk - 1) / chunk;

  auto process = [&](int64_t w) {
    const int64_t lo = w * chunk;
    const int64_t hi = lo + chunk < total ? lo + chunk : total;
    // First tensor whose range ends after `lo`.
    int64_t t = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
    for (; t < n_tensors && offsets[t] < hi; ++t) {
      const int64_t begin = (lo > offsets[t] ? lo : offsets[t]) - offsets[t];
      const int64_t end = (hi < offsets[t + 1] ? hi : offsets[t + 1]) - offsets[t];
      if (end <= begin) continue;
      S* const* tp = reinterpret_cast<S* const*>(ptrs + t * 5);
      fn(tp[0] + begin, tp[1] + begin, tp[2] + begin, tp[3] + begin,
         amsbound ? tp[4] + begin : nullptr, end - begin, scalars[t]);
    }
  };
#if defined(_OPENMP)
  if (num_threads > 1 && n_work > 1) {
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t w = 0; w < n_work; ++w) process(w);
    return 0;
  }
#endif
  (void)num_threads;
  for (int64_t w = 0; w < n_work; ++w) process(w);
  return 0;
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float64, 2 bfloat16, 3 float16. ptrs: n_tensors rows of
// (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq). Returns 0 on success.
int dynabound_adabound_cpu(int dtype, int64_t n_tensors, void* const* ptrs, const int64_t* numels,
                           const double* coef, const double* hyper, int weight_decay_mode,
                           int amsbound, int unscale, int num_threads, int64_t chunk) {
  if (chunk <= 0) return 2;
  switch (dtype) {
    case 0:
      return run<float>(n_tensors, ptrs, numels, coef, hyper, weight_decay_mode, amsbound,
                        unscale, num_threads, chunk);
    case 1:
      return run<double>(n_tensors, ptrs, numels, coef, hyper, weight_decay_mode, amsbound,
                         unscale, num_threads, chunk);
    case 2:
      return run<BFloat16>(n_tensors, ptrs, numels, coef, hyper, weight_decay_mode, amsbound,
                           unscale, num_threads, chunk);
#if DB_HAS_FLOAT16
    case 3:
      return run<_Float16>(n_tensors, ptrs, numels, coef, hyper, weight_decay_mode, amsbound,
                           unscale, num_threads, chunk);
#endif
    default:
      return 1;
  }
}

// Adds one to each float32 step counter (as `step += 1` would) and returns the new values.
void dynabound_increment_steps(int64_t n, float* const* steps, double* values) {
  for (int64_t i = 0; i < n; ++i) {
    *steps[i] += 1.0f;
    values[i] = *steps[i];
  }
}

// Bit mask of the storage dtypes this build supports (bit i set: dtype code i).
int dynabound_supported_dtypes() { return 0x7 | (DB_HAS_FLOAT16 << 3); }

// 1 when the AVX2 copy of the loop is used on this machine.
int dynabound_uses_avx2() {
#if DB_X86_DISPATCH
  return cpu_has_avx2() ? 1 : 0;
#else
  return 0;
#endif
}

}  // extern "C"

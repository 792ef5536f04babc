// Fused AdaBound/AMSBound step for CPU tensors: one pass per element over p, g, m, v (, vmax).
//
// Deliberately free of torch headers, which are slow to compile: Python passes raw data
// pointers, element counts and the per-tensor scalars from dynabound.bounds.step_coefficients.
// The element-wise math mirrors dynabound.functional._single_tensor_adabound operation by
// operation (no FMA contraction: -ffp-contract=off), in float for float/bfloat16/float16
// storage and in double for double storage. It is written once, in update_value, which every
// loop below calls; the AVX-512 8-bit loop (cpu_kernel_avx512.h) is the one deliberate
// copy, in vector intrinsics, and the tests hold it to the same bits.
//
// Vectorisation: the loop is plain C++ that GCC/Clang vectorise at -O3. On x86-64 two more
// copies are compiled, for AVX2+F16C and for AVX-512 (512-bit vectors), and the widest the
// CPU supports is picked at run time, so the shared object is portable between machines that
// share an extension cache (no -march=native). Without FMA contraction every copy computes
// the same bits; DYNABOUND_CPU_ISA=generic|avx2 caps the choice (tests, benchmarks).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
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
// GCC's generic tuning keeps 256-bit vectors even where AVX-512 is enabled; ask for 512.
#if defined(__clang__)
#define DB_TARGET_AVX512 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq"), min_vector_width(512)))
#else
#define DB_TARGET_AVX512 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")))
#endif
#else
#define DB_X86_DISPATCH 0
#endif

#if DB_X86_DISPATCH
#include <immintrin.h>
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

// How weight decay enters the update: not at all, as an L2 term of the gradient, as a
// factor of the parameter, or kEitherDecay: the L2 term picked by a flag at run time and
// the factor always applied (1 when decay is off), so that one instance of a loop serves
// every mode without a branch in it (the loops of low-precision state).
enum WeightDecay { kNoDecay = 0, kCoupled = 1, kDecoupled = 2, kEitherDecay = 3 };

// What final_lr="auto" reads of one element's update (dynabound.spec.StepTensors.projection):
// its Adam step before the bounds, per unit of lr * scale (the unclipped rate times the new
// m), and the gradient the update used (signed, unscaled, with the L2 term).
template <typename T>
struct ProjectionTerms {
  T step, grad;
};

// One work unit's share of the projection sums, sum(step^2) and sum(step*grad), kept as
// kLanes partial sums each: element i of every kLanes-element stretch adds to lane i, so the
// vector copies of a loop and its scalar form add the same numbers in the same order (the
// compiler reassociates nothing), and total() adds the lanes in order.
//
// A unit's lanes are float64 (A), but no loop adds each element's float64 products: the
// conversions and float64 arithmetic of every element would lengthen a step by a fifth or
// more where the arithmetic bounds it (one thread, AVX2, the encoded loops), and with 16
// float64 lanes in the loop GCC vectorised the float32 loops for AVX2 not at all (an
// estimating step 5x an ordinary one). Every loop sums the products of a block of its
// elements (256 floats) in lanes of its arithmetic type first, 16 terms per lane, and adds
// those to the float64 lanes: the totals stay within about 1e-7 of the exact ones.
// A block's partial sums are LaneSums of the loop's arithmetic type, added to a unit's by
// add_lanes.
template <int kLanes, typename A = double>
struct LaneSums {
  alignas(64) A squares[kLanes];
  alignas(64) A along[kLanes];

  DB_INLINE void clear() {
    for (int l = 0; l < kLanes; ++l) squares[l] = along[l] = A(0);
  }
  // A block's per-lane partial sums, each added to its lane.
  template <typename T>
  DB_INLINE void add_lanes(const LaneSums<kLanes, T>& block) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      squares[l] += static_cast<A>(block.squares[l]);
      along[l] += static_cast<A>(block.along[l]);
    }
  }
  // The terms of a block's elements [0, n), its lanes restarting every kLanes elements,
  // summed per lane in float32 and then added to the float64 lanes. `omp simd` makes the
  // lanes the vector's lanes: left to itself, GCC unrolls the lane loop and then packs its
  // statements into vectors piecemeal, through scalar loads and shuffles.
  DB_INLINE void add_block(const float* __restrict step, const float* __restrict grad,
                           int32_t n) {
    LaneSums<kLanes, float> block;
    block.clear();
    int32_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        block.squares[l] += step[j + l] * step[j + l];
        block.along[l] += step[j + l] * grad[j + l];
      }
    }
    for (int l = 0; j + l < n; ++l) {
      block.squares[l] += step[j + l] * step[j + l];
      block.along[l] += step[j + l] * grad[j + l];
    }
    add_lanes(block);
  }
  DB_INLINE void total(double* out) const {
    double a = 0.0, b = 0.0;
    for (int l = 0; l < kLanes; ++l) {
      a += squares[l];
      b += along[l];
    }
    out[0] = a;
    out[1] = b;
  }
};

// The float loops' lanes: one cache line of stored elements, the stretch update_elements
// takes at a time.
template <typename S>
using UnitSums = LaneSums<int(64 / sizeof(S))>;

// The float loops' partial sums of a block of kBlockLines cache lines, per lane in the
// arithmetic type (float32, or float64 for float64 parameters), kBlockLines terms per lane.
// A lane is one element of a cache line, so float32 parameters have 256-element blocks.
constexpr int64_t kBlockLines = 16;
template <typename S>
using LineBlock = LaneSums<int(64 / sizeof(S)), typename Io<S>::Math>;

// The update of one element in the arithmetic type T, from the loaded values to the ones
// to store: returns the new parameter, and leaves the new moments in m, v and (AMSBound)
// vmax. The one scalar copy of the update rule: every loop of this file computes through
// it; the AVX-512 loop of cpu_kernel_avx512.h is the one deliberate vector copy.
//
//   g = -g (maximize);  g += wd * p  or  p *= decay;  m = b1*m + (1-b1)*g;
//   v = b2*v + (1-b2)*g*g;  u = max(vmax, v) (AMSBound) else v;
//   rate = clamp(numerator / (sqrt(u) + eps), lower, upper) * lr * scale;  p -= rate * m;
//   p = clamp(p, box).
//
// The comparisons are written so that NaN propagates, as torch.clamp/maximum do. kPlain:
// the caller knows the step minimises with no decay and no box, whose identities (a sign
// of 1, a factor of 1, clamps at -inf and inf) are then skipped; they change no bit.
// terms: where to leave what the projection sums read, or null (a constant null in every
// caller that does not project, so the compiler drops it).
template <typename T, int WD, bool AMS, bool kPlain>
DB_INLINE T update_value(T grad, T param, T& m, T& v, T& vmax, const Scalars<T>& k,
                         bool coupled, ProjectionTerms<T>* terms = nullptr) {
  if (!kPlain) {
    grad = grad * k.sign;
    if (WD == kCoupled) grad = grad + k.weight_decay * param;
    if (WD == kDecoupled) param = param * k.decay;
    if (WD == kEitherDecay) {
      const T coupled_grad = grad + k.weight_decay * param;  // 0 * inf is NaN: select it
      grad = coupled ? coupled_grad : grad;
      param = param * k.decay;
    }
  }
  m = m * k.beta1 + k.one_minus_beta1 * grad;
  v = v * k.beta2 + k.one_minus_beta2 * grad * grad;
  T second = v;
  if (AMS) {
    vmax = (vmax < v || v != v) ? v : vmax;
    second = vmax;
  }
  T rate = (T(1) / (std::sqrt(second) + k.eps)) * k.numerator;
  if (terms != nullptr) {
    terms->step = rate * m;
    terms->grad = grad;
  }
  rate = rate < k.lower ? k.lower : rate;
  rate = rate > k.upper ? k.upper : rate;
  rate = rate * k.rate_scale;
  param = param - rate * m;
  if (!kPlain) {
    param = param < k.box_lo ? k.box_lo : param;
    param = param > k.box_hi ? k.box_hi : param;
  }
  return param;
}

// Moments stored in the parameter's dtype: n elements, each loaded, updated and stored.
// PROJ: element i's projection terms go to lane i of block (n is at most a cache line).
template <typename S, int WD, bool AMS, bool UNSCALE, bool PROJ>
DB_INLINE void update_elements(S* __restrict p, S* __restrict g, S* __restrict m, S* __restrict v,
                               S* __restrict vmax, int64_t n,
                               const Scalars<typename Io<S>::Math>& k,
                               LineBlock<S>* __restrict block) {
  using T = typename Io<S>::Math;
  // A flag read per element would keep GCC from vectorising these loops: the mode is
  // a template argument, and the run-time flag passed below is unused.
  static_assert(WD != kEitherDecay, "the float loops take the weight decay mode at compile time");
  for (int64_t i = 0; i < n; ++i) {
    T grad = Io<S>::load(g[i]);
    if (UNSCALE) {
      grad = grad / k.grad_scale;
      g[i] = Io<S>::store(grad);  // like torch's fused Adam: gradients are left unscaled
    }
    T avg = Io<S>::load(m[i]);
    T avg_sq = Io<S>::load(v[i]);
    T running = T(0);
    if constexpr (AMS) running = Io<S>::load(vmax[i]);
    ProjectionTerms<T> terms;
    const T param = update_value<T, WD, AMS, false>(grad, Io<S>::load(p[i]), avg, avg_sq,
                                                    running, k, false, PROJ ? &terms : nullptr);
    if constexpr (PROJ) {
      block->squares[i] += terms.step * terms.step;
      block->along[i] += terms.step * terms.grad;
    }
    if constexpr (AMS) vmax[i] = Io<S>::store(running);
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
template <typename S, int WD, bool AMS, bool UNSCALE, bool PROJ>
DB_INLINE void update_body(S* __restrict p, S* __restrict g, S* __restrict m, S* __restrict v,
                           S* __restrict vmax, int64_t n, const Scalars<typename Io<S>::Math>& k,
                           UnitSums<S>* sums) {
  constexpr int64_t line = 64 / sizeof(S);
  constexpr int64_t ahead = kPrefetchLines * line;
  UnitSums<S> local;  // in registers while the loop runs
  LineBlock<S> block;
  if constexpr (PROJ) {
    local = *sums;
    block.clear();
  }
  int64_t i = 0;
  for (; i + line <= n; i += line) {
#if defined(__GNUC__)
    __builtin_prefetch(g + i + ahead, 0);
    __builtin_prefetch(p + i + ahead, 1);
    __builtin_prefetch(m + i + ahead, 1);
    __builtin_prefetch(v + i + ahead, 1);
    if (AMS) __builtin_prefetch(vmax + i + ahead, 1);
#endif
    update_elements<S, WD, AMS, UNSCALE, PROJ>(p + i, g + i, m + i, v + i,
                                               AMS ? vmax + i : vmax, line, k, &block);
    if constexpr (PROJ) {
      if ((i / line) % kBlockLines == kBlockLines - 1) {
        local.add_lanes(block);
        block.clear();
      }
    }
  }
  update_elements<S, WD, AMS, UNSCALE, PROJ>(p + i, g + i, m + i, v + i, AMS ? vmax + i : vmax,
                                             n - i, k, &block);
  if constexpr (PROJ) {
    local.add_lanes(block);
    *sums = local;
  }
}

template <typename S, int WD, bool AMS, bool UNSCALE, bool PROJ>
void update_generic(S* p, S* g, S* m, S* v, S* vmax, int64_t n,
                    const Scalars<typename Io<S>::Math>& k, UnitSums<S>* sums) {
  update_body<S, WD, AMS, UNSCALE, PROJ>(p, g, m, v, vmax, n, k, sums);
}

// The instruction sets a copy of the loops is compiled for.
enum Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest copy this CPU runs, capped by DYNABOUND_CPU_ISA; decided once per process.
int vector_isa() {
  static const int isa = [] {
    int best = kGeneric;
#if DB_X86_DISPATCH
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      best = kAvx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        best = kAvx512;
      }
    }
#endif
    const char* cap = std::getenv("DYNABOUND_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "generic") == 0) return int(kGeneric);
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min(best, int(kAvx2));
    return best;
  }();
  return isa;
}

#if DB_X86_DISPATCH
template <typename S, int WD, bool AMS, bool UNSCALE, bool PROJ>
DB_TARGET_AVX2 void update_avx2(S* p, S* g, S* m, S* v, S* vmax, int64_t n,
                                const Scalars<typename Io<S>::Math>& k, UnitSums<S>* sums) {
  update_body<S, WD, AMS, UNSCALE, PROJ>(p, g, m, v, vmax, n, k, sums);
}

template <typename S, int WD, bool AMS, bool UNSCALE, bool PROJ>
DB_TARGET_AVX512 void update_avx512(S* p, S* g, S* m, S* v, S* vmax, int64_t n,
                                    const Scalars<typename Io<S>::Math>& k, UnitSums<S>* sums) {
  update_body<S, WD, AMS, UNSCALE, PROJ>(p, g, m, v, vmax, n, k, sums);
}
#endif

template <typename S>
using UpdateFn = void (*)(S*, S*, S*, S*, S*, int64_t, const Scalars<typename Io<S>::Math>&,
                          UnitSums<S>*);

template <typename S, int WD, bool AMS, bool UNSCALE, bool PROJ>
UpdateFn<S> pick_isa(int isa) {
#if DB_X86_DISPATCH
  if (isa == kAvx512) return &update_avx512<S, WD, AMS, UNSCALE, PROJ>;
  if (isa == kAvx2) return &update_avx2<S, WD, AMS, UNSCALE, PROJ>;
#endif
  (void)isa;
  return &update_generic<S, WD, AMS, UNSCALE, PROJ>;
}

// The loops that accumulate the projection sums are separate instances (PROJ), so an
// ordinary step runs exactly the loops it ran without them, one per weight decay mode.
template <typename S, int WD, bool AMS, bool UNSCALE>
UpdateFn<S> pick_projection(bool project, int isa) {
  return project ? pick_isa<S, WD, AMS, UNSCALE, true>(isa)
                 : pick_isa<S, WD, AMS, UNSCALE, false>(isa);
}

template <typename S, int WD>
UpdateFn<S> pick_flags(bool ams, bool unscale, bool project, int isa) {
  if (ams) {
    return unscale ? pick_projection<S, WD, true, true>(project, isa)
                   : pick_projection<S, WD, true, false>(project, isa);
  }
  return unscale ? pick_projection<S, WD, false, true>(project, isa)
                 : pick_projection<S, WD, false, false>(project, isa);
}

// process(0), ..., process(n - 1): units of similar cost, handed out one at a time to
// num_threads OpenMP threads (one parallel region per step; torch's per-op regions would
// each end at a barrier).
template <typename Process>
void for_each_unit(int64_t n, int num_threads, const Process& process) {
#if defined(_OPENMP)
  if (num_threads > 1 && n > 1) {
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t w = 0; w < n; ++w) process(w);
    return;
  }
#endif
  (void)num_threads;
  for (int64_t w = 0; w < n; ++w) process(w);
}

// Adds the units' partial projection sums (a pair per unit) to projection in unit order:
// the total depends on neither the thread count nor the order the threads ran the units in.
void add_partial_sums(const std::vector<double>& partial, double* projection) {
  double squares = 0.0, along = 0.0;
  for (size_t w = 0; w + 1 < partial.size(); w += 2) {
    squares += partial[w];
    along += partial[w + 1];
  }
  projection[0] += squares;
  projection[1] += along;
}

// The arrays Python passes, by position (HYPER, COEF and ENCODED_COEF in cpu.py), each
// listed once here. dynabound_layout() exports the names, and cpu.py compares them with its
// own when it loads the library: a field added on one side only stops the load instead of
// shifting every value after it.
// `hyper`, shared by the tensors of a call: the step's floats (dynabound.spec.FLOATS), then
// what Python derives from the other fields.
#define DB_HYPER_LAYOUT(X)                                                                    \
  X(lr) X(beta1) X(beta2) X(final_lr) X(base_lr) X(gamma) X(eps) X(weight_decay) X(decay)    \
  X(sign) X(grad_scale) X(box_lo) X(box_hi)
// A row of `coef` per tensor: its step's scalars; the encoded kernel's rows add the
// tensor's random seed (mod 2^32) and its step.
#define DB_COEF_LAYOUT(X) X(numerator) X(lower) X(upper) X(rate_scale)
#define DB_ENCODED_COEF_LAYOUT(X) DB_COEF_LAYOUT(X) X(seed) X(step)

#define DB_POSITION(name) name,
struct Hyper {
  enum Position : int { DB_HYPER_LAYOUT(DB_POSITION) size };
};
struct Coef {
  enum Position : int { DB_COEF_LAYOUT(DB_POSITION) size };
};
struct EncodedCoef {
  enum Position : int { DB_ENCODED_COEF_LAYOUT(DB_POSITION) size };
};
#undef DB_POSITION

// The scalars every tensor of a call shares, from the `hyper` array.
template <typename T>
Scalars<T> shared_scalars(const double* hyper) {
  Scalars<T> k;
  k.beta1 = static_cast<T>(hyper[Hyper::beta1]);
  k.one_minus_beta1 = static_cast<T>(1.0 - hyper[Hyper::beta1]);
  k.beta2 = static_cast<T>(hyper[Hyper::beta2]);
  k.one_minus_beta2 = static_cast<T>(1.0 - hyper[Hyper::beta2]);
  k.eps = static_cast<T>(hyper[Hyper::eps]);
  k.weight_decay = static_cast<T>(hyper[Hyper::weight_decay]);
  k.decay = static_cast<T>(hyper[Hyper::decay]);
  k.sign = static_cast<T>(hyper[Hyper::sign]);
  k.grad_scale = static_cast<T>(hyper[Hyper::grad_scale]);
  k.box_lo = static_cast<T>(hyper[Hyper::box_lo]);
  k.box_hi = static_cast<T>(hyper[Hyper::box_hi]);
  return k;
}

// projection: null, or two doubles to which the step adds its projection sums.
template <typename S>
int run(int64_t n_tensors, void* const* ptrs, const int64_t* numels, const double* coef,
        const double* hyper, int weight_decay_mode, int amsbound, int unscale, int num_threads,
        int64_t chunk, double* projection) {
  using T = typename Io<S>::Math;
  const int isa = vector_isa();
  const bool project = projection != nullptr;
  UpdateFn<S> fn;
  switch (weight_decay_mode) {
    case kNoDecay: fn = pick_flags<S, kNoDecay>(amsbound, unscale, project, isa); break;
    case kCoupled: fn = pick_flags<S, kCoupled>(amsbound, unscale, project, isa); break;
    case kDecoupled: fn = pick_flags<S, kDecoupled>(amsbound, unscale, project, isa); break;
    default: return 2;
  }

  const Scalars<T> base = shared_scalars<T>(hyper);

  // Work unit w covers elements [w*chunk, (w+1)*chunk) of all tensors laid end to end, so
  // many small tensors share a unit and the units have equal cost.
  std::vector<Scalars<T>> scalars(n_tensors, base);
  std::vector<int64_t> offsets(n_tensors + 1, 0);
  for (int64_t t = 0; t < n_tensors; ++t) {
    const double* c = coef + t * Coef::size;
    scalars[t].numerator = static_cast<T>(c[Coef::numerator]);
    scalars[t].lower = static_cast<T>(c[Coef::lower]);
    scalars[t].upper = static_cast<T>(c[Coef::upper]);
    scalars[t].rate_scale = static_cast<T>(c[Coef::rate_scale]);
    offsets[t + 1] = offsets[t] + numels[t];
  }
  const int64_t total = offsets[n_tensors];
  const int64_t n_work = (total + chunk - 1) / chunk;
  std::vector<double> partial(project ? 2 * n_work : 0);

  auto process = [&](int64_t w) {
    const int64_t lo = w * chunk;
    const int64_t hi = lo + chunk < total ? lo + chunk : total;
    UnitSums<S> sums;
    if (project) sums.clear();
    // First tensor whose range ends after `lo`.
    int64_t t = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
    for (; t < n_tensors && offsets[t] < hi; ++t) {
      const int64_t begin = (lo > offsets[t] ? lo : offsets[t]) - offsets[t];
      const int64_t end = (hi < offsets[t + 1] ? hi : offsets[t + 1]) - offsets[t];
      if (end <= begin) continue;
      S* const* tp = reinterpret_cast<S* const*>(ptrs + t * 5);
      fn(tp[0] + begin, tp[1] + begin, tp[2] + begin, tp[3] + begin,
         amsbound ? tp[4] + begin : nullptr, end - begin, scalars[t], project ? &sums : nullptr);
    }
    if (project) sums.total(&partial[2 * w]);
  };
  for_each_unit(n_work, num_threads, process);
  if (project) add_partial_sums(partial, projection);
  return 0;
}


// ---- Moments stored in bfloat16 or block-wise 8 bits (dynabound/state_formats.py) ----
//
// Each moment is decoded into float, updated as above, and encoded again with stochastic
// rounding: the random bits are lowbias32(element index + key), the key a hash of the
// parameter's seed and step (step_key), so every backend draws the same bits. 8-bit codes
// keep a float's exponent and top 3 mantissa bits relative to the block's largest
// magnitude (the block's float32 scale); code 0 is zero.

constexpr int64_t kBlock = 256;
constexpr int kCut = 20;          // float bits below the 3 mantissa bits a code keeps
constexpr int kNoiseShift = 4;    // 16 noise bits placed just below the cut
constexpr int32_t kFirstOffset = ((127 - 15) << 3) - 1;   // signed exp_avg: 2^-15 range
constexpr int32_t kSecondOffset = ((127 - 31) << 3) - 1;  // exp_avg_sq, max: 2^-31 range

// kStateParam: moments in the parameter's dtype, rounded to nearest (stochastic rounding
// of bfloat16 parameters alone).
enum StateFormat { kStateBFloat16 = 0, kState8Bit = 1, kStateParam = 2 };

DB_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

DB_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

DB_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

DB_INLINE uint16_t bfloat16_stochastic(float x, uint32_t noise) {
  return x != x ? uint16_t(0x7FC0) : static_cast<uint16_t>((float_bits(x) + noise) >> 16);
}

// Integer selects only, so that the loops vectorise. The sign goes into the bits before
// the multiply, which rounds -a * s exactly as -(a * s).
DB_INLINE float decode8(int32_t code, int32_t offset, float scale) {
  const int32_t magnitude = code < 0 ? -code : code;
  uint32_t bits = uint32_t(magnitude + offset) << kCut;
  bits = magnitude != 0 ? bits : 0u;
  bits |= uint32_t(code) & 0x80000000u;
  return bits_float(bits) * scale;
}

// Magnitude code of x / scale (inverse = 1 / scale, or 0 for a zero scale). NaN gives code
// 0: the comparisons are ordered so that NaN fails the first. kFinite: the caller knows that
// x * inverse is a finite non-negative float (scale and inverse finite), which makes the
// clamp a single integer minimum.
template <bool kFinite>
DB_INLINE int32_t encode8(float magnitude, float inverse, uint32_t noise, int32_t offset) {
  float relative = magnitude * inverse;
  uint32_t bits;
  if (kFinite) {
    // A non-negative float orders as its bits do: an integer minimum, one instruction.
    bits = float_bits(relative);
    bits = bits < 0x3F800000u ? bits : 0x3F800000u;  // 1.0f
  } else {
    relative = relative > 0.0f ? relative : 0.0f;
    relative = relative < 1.0f ? relative : 1.0f;
    bits = float_bits(relative);
  }
  const int32_t top = int32_t((bits + (noise << kNoiseShift)) >> kCut);
  const int32_t code = top - offset;
  return code < 0 ? 0 : code;
}

// Block maxima are found on the bits of |x|: non-negative floats order as their bits do, and
// NaN's bits exceed infinity's, so an integer maximum (which vectorises, unlike a float one)
// finds the largest magnitude, or NaN if any x is NaN (as torch.amax).
DB_INLINE float magnitude_of(uint32_t bits) {
  return bits > 0x7F800000u ? std::numeric_limits<float>::quiet_NaN() : bits_float(bits);
}

// 1 / scale, raised by one ulp where scale * (1 / scale) rounds below 1, so that the block's
// largest magnitude encodes as exactly 1.0 (its scale): decoding and re-encoding to nearest
// then gives the same codes and scales (state_formats.encode does the same).
DB_INLINE float inverse_of(float scale) {
  if (!(scale > 0.0f)) return 0.0f;
  const float inverse = 1.0f / scale;
  return scale * inverse < 1.0f ? std::nextafter(inverse, std::numeric_limits<float>::infinity())
                                : inverse;
}

struct EncodedTensor {
  void* p;
  void* g;
  void* m;
  void* v;
  void* vmax;
  float* m_scale;
  float* v_scale;
  float* vmax_scale;
};

// The encoded loops' projection sums: 16 lanes, the AVX-512 loop's float32 lanes, which
// every block (256 elements) starts at lane 0 of.
using EncodedSums = LaneSums<16>;

struct EncodedScalars {
  Scalars<float> k;
  uint32_t key_state, key_param;
  bool coupled;  // L2 weight decay on: weight_decay != 0 and not decoupled
  bool plain;    // no weight decay, no box, minimising: the update's identities skipped
};

// The float32 update of element j of a stretch starting at p, g (update_value): m, v and
// vmax hold the decoded moments and receive the new ones. The arithmetic has no
// data-dependent branches, so the loops around it vectorise: weight decay is kEitherDecay,
// a select on a loop-invariant flag (a coupled term 0 * p would make an infinite
// parameter's gradient NaN) and a decay factor of 1 when off, and a bfloat16 parameter's
// rounding adds either the random bits or round-to-nearest-even's increment. param_key:
// the parameter's random key plus the stretch's first element index.
template <typename S, bool AMS, bool kPlain = false>
DB_INLINE void update_element(S* __restrict p, const S* __restrict g, int32_t j,
                              uint32_t param_key, float& m, float& v, float& vmax,
                              const EncodedScalars& es, bool round_param,
                              ProjectionTerms<float>* terms = nullptr) {
  const float param = update_value<float, kEitherDecay, AMS, kPlain>(
      Io<S>::load(g[j]), Io<S>::load(p[j]), m, v, vmax, es.k, es.coupled, terms);
  if constexpr (std::is_same_v<S, BFloat16>) {
    const uint32_t u = float_bits(param);
    const uint32_t random = mix32(param_key + uint32_t(j)) & 0xFFFFu;
    const uint32_t increment = round_param ? random : 0x7FFFu + ((u >> 16) & 1u);
    p[j] = BFloat16{param != param ? uint16_t(0x7FC0) : uint16_t((u + increment) >> 16)};
  } else {
    (void)param_key;
    (void)round_param;
    p[j] = Io<S>::store(param);
  }
}

// A block's projection terms, kept for one pass over them after its update (in L1 cache)
// in the loops whose elements do not map to lanes one to one; none in the other instances.
template <bool kProject>
struct BlockTerms {
  alignas(64) float step[kProject ? kBlock : 1];
  alignas(64) float grad[kProject ? kBlock : 1];

  DB_INLINE void keep(int32_t j, const ProjectionTerms<float>& terms) {
    if constexpr (kProject) {
      step[j] = terms.step;
      grad[j] = terms.grad;
    }
  }
  DB_INLINE void add_to(EncodedSums* sums, int32_t n) const {
    if constexpr (kProject) sums->add_block(step, grad, n);
  }
};

// Moments stored as bfloat16 (F = kStateBFloat16) or in the parameter's dtype
// (kStateParam): one block's update into float32 buffers, then its rounding and store.
// kProject: the block's projection terms are added to sums.
template <typename S, int F, bool AMS, bool kPlain, bool kProject>
DB_INLINE void update_wide_block(const EncodedTensor& t, int64_t start, int32_t n,
                                 const EncodedScalars& es, bool round_param, EncodedSums* sums) {
  using M = std::conditional_t<F == kStateParam, S, BFloat16>;
  M* __restrict m_store = static_cast<M*>(t.m) + start;
  M* __restrict v_store = static_cast<M*>(t.v) + start;
  M* __restrict vmax_store = AMS ? static_cast<M*>(t.vmax) + start : nullptr;
  S* p = static_cast<S*>(t.p) + start;
  const S* g = static_cast<const S*>(t.g) + start;
  const uint32_t param_key = es.key_param + uint32_t(start);
  alignas(64) float m[kBlock], v[kBlock], vmax[kBlock];
  BlockTerms<kProject> kept;
  for (int32_t j = 0; j < n; ++j) {
    m[j] = Io<M>::load(m_store[j]);
    v[j] = Io<M>::load(v_store[j]);
    vmax[j] = AMS ? Io<M>::load(vmax_store[j]) : 0.0f;
    ProjectionTerms<float> terms;
    update_element<S, AMS, kPlain>(p, g, j, param_key, m[j], v[j], vmax[j], es, round_param,
                                   kProject ? &terms : nullptr);
    kept.keep(j, terms);
  }
  kept.add_to(sums, n);
  if constexpr (F == kStateParam) {
    for (int32_t j = 0; j < n; ++j) {
      m_store[j] = Io<M>::store(m[j]);
      v_store[j] = Io<M>::store(v[j]);
      if (AMS) vmax_store[j] = Io<M>::store(vmax[j]);
    }
  } else {
    const uint32_t key = es.key_state + uint32_t(start);
    for (int32_t j = 0; j < n; ++j) {
      const uint32_t r = mix32(key + uint32_t(j));
      m_store[j] = BFloat16{bfloat16_stochastic(m[j], r & 0xFFFFu)};
      v_store[j] = BFloat16{bfloat16_stochastic(v[j], r >> 16)};
      if (AMS) vmax_store[j] = BFloat16{bfloat16_stochastic(vmax[j], r >> 16)};
    }
  }
}

template <typename S, int F, bool AMS, bool kProject>
DB_INLINE void update_wide_body(const EncodedTensor& t, int64_t begin, int64_t end,
                                const EncodedScalars& es, bool round_param, EncodedSums* sums) {
  for (int64_t start = begin; start < end; start += kBlock) {
    const int32_t n = int32_t(end - start < kBlock ? end - start : kBlock);
    if (es.plain) {
      update_wide_block<S, F, AMS, true, kProject>(t, start, n, es, round_param, sums);
    } else {
      update_wide_block<S, F, AMS, false, kProject>(t, start, n, es, round_param, sums);
    }
  }
}

// One block's float32 moments (decoded, then updated in place) and their codes.
struct Block8 {
  alignas(64) float m[kBlock];
  alignas(64) float v[kBlock];
  alignas(64) float vmax[kBlock];
};

struct Codes8 {
  alignas(64) int32_t m[kBlock];
  alignas(64) int32_t v[kBlock];
  alignas(64) int32_t vmax[kBlock];
};

// A block's scales (largest magnitudes) and the factors that encode relative to them.
struct Scales8 {
  float m, v, vmax, m_inverse, v_inverse, vmax_inverse;
  bool finite;  // every scale and inverse finite, so every |x| * inverse is too

  // From the bits of the largest |x| of each moment (see magnitude_of).
  DB_INLINE void set(uint32_t m_top, uint32_t v_top, uint32_t vmax_top) {
    m = magnitude_of(m_top);
    v = magnitude_of(v_top);
    vmax = magnitude_of(vmax_top);
    m_inverse = inverse_of(m);
    v_inverse = inverse_of(v);
    vmax_inverse = inverse_of(vmax);
    const float largest = std::numeric_limits<float>::max();
    finite = m <= largest && v <= largest && vmax <= largest && m_inverse <= largest &&
             v_inverse <= largest && vmax_inverse <= largest;
  }
};

DB_INLINE void keep_largest(uint32_t& top, float x) {
  const uint32_t bits = float_bits(x) & 0x7FFFFFFFu;
  top = bits > top ? bits : top;
}

template <bool AMS>
DB_INLINE void decode_block(const EncodedTensor& t, int64_t start, int32_t n, Block8& b) {
  const int64_t block = start / kBlock;
  const int8_t* __restrict m_codes = static_cast<const int8_t*>(t.m) + start;
  const uint8_t* __restrict v_codes = static_cast<const uint8_t*>(t.v) + start;
  const float m_scale = t.m_scale[block], v_scale = t.v_scale[block];
  for (int32_t j = 0; j < n; ++j) {
    b.m[j] = decode8(m_codes[j], kFirstOffset, m_scale);
    b.v[j] = decode8(v_codes[j], kSecondOffset, v_scale);
  }
  if (AMS) {
    const uint8_t* __restrict vmax_codes = static_cast<const uint8_t*>(t.vmax) + start;
    const float vmax_scale = t.vmax_scale[block];
    for (int32_t j = 0; j < n; ++j) b.vmax[j] = decode8(vmax_codes[j], kSecondOffset, vmax_scale);
  }
}

// Codes of element j of a block; key: the state's random key plus the block's first index.
// The second moments are never negative, nor -0 (sums of +0 and squares), so their
// magnitude is the value itself.
template <bool AMS, bool kFinite>
DB_INLINE void encode_element(const Block8& b, int32_t j, uint32_t key, const Scales8& s,
                              Codes8& c) {
  const uint32_t r = mix32(key + uint32_t(j));
  const int32_t m_code =
      encode8<kFinite>(std::fabs(b.m[j]), s.m_inverse, r & 0xFFFFu, kFirstOffset);
  c.m[j] = b.m[j] < 0.0f ? -m_code : m_code;
  c.v[j] = encode8<kFinite>(b.v[j], s.v_inverse, r >> 16, kSecondOffset);
  if (AMS) c.vmax[j] = encode8<kFinite>(b.vmax[j], s.vmax_inverse, r >> 16, kSecondOffset);
}

template <bool AMS, bool kFinite>
DB_INLINE void encode_rest(const Block8& b, int32_t from, int32_t to, uint32_t key,
                           const Scales8& s, Codes8& c) {
  for (int32_t j = from; j < to; ++j) encode_element<AMS, kFinite>(b, j, key, s, c);
}

template <bool AMS>
DB_INLINE void store_scales(const EncodedTensor& t, int64_t start, const Scales8& s) {
  const int64_t block = start / kBlock;
  t.m_scale[block] = s.m;
  t.v_scale[block] = s.v;
  if (AMS) t.vmax_scale[block] = s.vmax;
}

template <bool AMS>
DB_INLINE void store_block(const EncodedTensor& t, int64_t start, int32_t n, const Codes8& c,
                           const Scales8& s) {
  int8_t* __restrict m_codes = static_cast<int8_t*>(t.m) + start;
  uint8_t* __restrict v_codes = static_cast<uint8_t*>(t.v) + start;
  for (int32_t j = 0; j < n; ++j) {
    m_codes[j] = int8_t(c.m[j]);
    v_codes[j] = uint8_t(c.v[j]);
  }
  if (AMS) {
    uint8_t* __restrict vmax_codes = static_cast<uint8_t*>(t.vmax) + start;
    for (int32_t j = 0; j < n; ++j) vmax_codes[j] = uint8_t(c.vmax[j]);
  }
  store_scales<AMS>(t, start, s);
}

// The previous block of a pipelined 8-bit update: its new moments and scales, and the
// codes they are being encoded into.
struct Pending8 {
  const Block8* block;
  const Scales8* scales;
  Codes8* codes;
  uint32_t key;  // the state's random key plus the block's first element index
};

// Update of a block's elements [0, n), whose decoded moments are in b; its new scales go to
// s. kEncode: the previous block, which is whole, is encoded in the same loop. kProject: the
// block's projection terms are added to sums.
template <typename S, bool AMS, bool kPlain, bool kEncode, bool kProject>
DB_INLINE void update_block(S* __restrict p, const S* __restrict g, int32_t n,
                            uint32_t param_key, Block8& b, Scales8& s, const Pending8& pending,
                            const EncodedScalars& es, bool round_param, EncodedSums* sums) {
  uint32_t m_top = 0, v_top = 0, vmax_top = 0;
  BlockTerms<kProject> kept;
  for (int32_t j = 0; j < n; ++j) {
    ProjectionTerms<float> terms;
    update_element<S, AMS, kPlain>(p, g, j, param_key, b.m[j], b.v[j], b.vmax[j], es,
                                   round_param, kProject ? &terms : nullptr);
    kept.keep(j, terms);
    keep_largest(m_top, b.m[j]);
    keep_largest(v_top, b.v[j]);
    if (AMS) keep_largest(vmax_top, b.vmax[j]);
    if (kEncode) {
      encode_element<AMS, true>(*pending.block, j, pending.key, *pending.scales, *pending.codes);
    }
  }
  s.set(m_top, v_top, vmax_top);
  kept.add_to(sums, n);
}

template <typename S, bool AMS, bool kPlain, bool kProject>
DB_INLINE void update_block(S* p, const S* g, int32_t n, uint32_t param_key, Block8& b,
                            Scales8& s, const Pending8* pending, const EncodedScalars& es,
                            bool round_param, EncodedSums* sums) {
  if (pending != nullptr && pending->scales->finite) {
    update_block<S, AMS, kPlain, true, kProject>(p, g, n, param_key, b, s, *pending, es,
                                                 round_param, sums);
    encode_rest<AMS, true>(*pending->block, n, kBlock, pending->key, *pending->scales,
                           *pending->codes);
    return;
  }
  update_block<S, AMS, kPlain, false, kProject>(p, g, n, param_key, b, s, Pending8{}, es,
                                                round_param, sums);
  if (pending != nullptr) {
    encode_rest<AMS, false>(*pending->block, 0, kBlock, pending->key, *pending->scales,
                            *pending->codes);
  }
}

// The two blocks in flight in an 8-bit update: the one being updated, `current`, and the
// previous one, whose new moments and scales wait to be encoded.
struct Pipeline8 {
  Block8 blocks[2];
  Scales8 scales[2];
  Codes8 codes;
  int current = 0;
  int64_t previous_start = -1;  // none yet

  DB_INLINE Pending8 pending(const EncodedScalars& es) {
    return Pending8{&blocks[current ^ 1], &scales[current ^ 1], &codes,
                    es.key_state + uint32_t(previous_start)};
  }
  DB_INLINE void advance(int64_t start) {
    previous_start = start;
    current ^= 1;
  }
};

#if DB_X86_DISPATCH
#include "cpu_kernel_avx512.h"
#endif

// 8-bit moments, elements [begin, end) of one tensor. A block's codes need its new scale,
// its largest magnitude, so they can only be computed after the block's update. They are
// computed in the loop that updates the next block: that update alone is bound by the
// throughput of sqrt and division, and leaves the units that encoding needs idle
// (measured here: 3-4% faster than encoding each block after its own update).
template <typename S, bool AMS, bool kProject, bool kAvx512Loop>
DB_INLINE void update_8bit_body(const EncodedTensor& t, int64_t begin, int64_t end,
                                const EncodedScalars& es, bool round_param, EncodedSums* sums) {
  Pipeline8 pipe;
  int64_t start = begin;
#if DB_X86_DISPATCH
  if constexpr (kAvx512Loop && std::is_same_v<S, float>) {
    start = update_whole_blocks_avx512<AMS, kProject>(t, begin, end, pipe, es, sums);
  }
#endif
  for (; start < end; start += kBlock) {
    const int32_t n = int32_t(end - start < kBlock ? end - start : kBlock);
    Block8& b = pipe.blocks[pipe.current];
    const Pending8 pending = pipe.pending(es);
    const Pending8* before = pipe.previous_start >= 0 ? &pending : nullptr;
    decode_block<AMS>(t, start, n, b);
    S* p = static_cast<S*>(t.p) + start;
    const S* g = static_cast<const S*>(t.g) + start;
    const uint32_t param_key = es.key_param + uint32_t(start);
    Scales8& s = pipe.scales[pipe.current];
    if (es.plain) {
      update_block<S, AMS, true, kProject>(p, g, n, param_key, b, s, before, es, round_param,
                                           sums);
    } else {
      update_block<S, AMS, false, kProject>(p, g, n, param_key, b, s, before, es, round_param,
                                            sums);
    }
    if (before != nullptr) {
      store_block<AMS>(t, pipe.previous_start, kBlock, pipe.codes, *pending.scales);
    }
    pipe.advance(start);
  }
  if (pipe.previous_start < 0) return;
  const Pending8 last = pipe.pending(es);
  const int32_t n = int32_t(end - pipe.previous_start);
  if (last.scales->finite) {
    encode_rest<AMS, true>(*last.block, 0, n, last.key, *last.scales, pipe.codes);
  } else {
    encode_rest<AMS, false>(*last.block, 0, n, last.key, *last.scales, pipe.codes);
  }
  store_block<AMS>(t, pipe.previous_start, n, pipe.codes, *last.scales);
}

// Elements [begin, end) of one tensor; begin is a multiple of kBlock. kProject: their
// projection terms are added to sums (the accumulating loops are separate instances).
template <typename S, int F, bool AMS, bool kProject, bool kAvx512Loop = false>
DB_INLINE void update_encoded_body(const EncodedTensor& t, int64_t begin, int64_t end,
                                   const EncodedScalars& es, bool unscale, bool round_param,
                                   EncodedSums* sums) {
  if (unscale) {
    S* __restrict g = static_cast<S*>(t.g);
    const float grad_scale = es.k.grad_scale;
    for (int64_t i = begin; i < end; ++i) g[i] = Io<S>::store(Io<S>::load(g[i]) / grad_scale);
  }
  if constexpr (F == kState8Bit) {
    update_8bit_body<S, AMS, kProject, kAvx512Loop>(t, begin, end, es, round_param, sums);
  } else {
    update_wide_body<S, F, AMS, kProject>(t, begin, end, es, round_param, sums);
  }
}

template <typename S, int F, bool AMS, bool kProject>
void update_encoded_generic(const EncodedTensor& t, int64_t begin, int64_t end,
                            const EncodedScalars& es, bool unscale, bool round,
                            EncodedSums* sums) {
  update_encoded_body<S, F, AMS, kProject>(t, begin, end, es, unscale, round, sums);
}

#if DB_X86_DISPATCH
template <typename S, int F, bool AMS, bool kProject>
DB_TARGET_AVX2 void update_encoded_avx2(const EncodedTensor& t, int64_t begin, int64_t end,
                                        const EncodedScalars& es, bool unscale, bool round,
                                        EncodedSums* sums) {
  update_encoded_body<S, F, AMS, kProject>(t, begin, end, es, unscale, round, sums);
}

template <typename S, int F, bool AMS, bool kProject>
DB_TARGET_AVX512 void update_encoded_avx512(const EncodedTensor& t, int64_t begin, int64_t end,
                                            const EncodedScalars& es, bool unscale, bool round,
                                            EncodedSums* sums) {
  update_encoded_body<S, F, AMS, kProject, true>(t, begin, end, es, unscale, round, sums);
}
#endif

using EncodedFn = void (*)(const EncodedTensor&, int64_t, int64_t, const EncodedScalars&, bool,
                           bool, EncodedSums*);

template <typename S, int F, bool AMS, bool kProject>
EncodedFn pick_encoded_isa(int isa) {
#if DB_X86_DISPATCH
  if (isa == kAvx512) return &update_encoded_avx512<S, F, AMS, kProject>;
  if (isa == kAvx2) return &update_encoded_avx2<S, F, AMS, kProject>;
#endif
  (void)isa;
  return &update_encoded_generic<S, F, AMS, kProject>;
}

template <typename S, int F>
EncodedFn pick_encoded_flags(bool ams, bool project, int isa) {
  if (ams) {
    return project ? pick_encoded_isa<S, F, true, true>(isa)
                   : pick_encoded_isa<S, F, true, false>(isa);
  }
  return project ? pick_encoded_isa<S, F, false, true>(isa)
                 : pick_encoded_isa<S, F, false, false>(isa);
}

template <typename S>
EncodedFn pick_encoded(int state_format, bool ams, bool project, int isa) {
  if (state_format == kStateParam) return pick_encoded_flags<S, kStateParam>(ams, project, isa);
  if (state_format == kState8Bit) return pick_encoded_flags<S, kState8Bit>(ams, project, isa);
  return pick_encoded_flags<S, kStateBFloat16>(ams, project, isa);
}

// state_formats.step_key in 32-bit unsigned arithmetic, whose wraparound is its masking.
enum Stream : uint32_t { kStreamState = 0, kStreamParam = 1 };
uint32_t step_key(uint32_t seed, uint32_t step, Stream stream) {
  return mix32(mix32(seed * 0x9E3779B9u + stream) + step);
}

template <typename S>
int run_encoded(int state_format, int64_t n_tensors, void* const* ptrs, const int64_t* numels,
                const double* coef, const double* hyper, int weight_decay_mode, int amsbound,
                int unscale, int round_param, int num_threads, int64_t chunk,
                double* projection) {
  const bool project = projection != nullptr;
  const EncodedFn fn = pick_encoded<S>(state_format, amsbound != 0, project, vector_isa());
  Scalars<float> base = shared_scalars<float>(hyper);
  // Decoupled decay as arithmetic (a factor of 1 when off), so the loops need no branch.
  if (weight_decay_mode != kDecoupled) base.decay = 1.0f;
  const bool coupled = weight_decay_mode == kCoupled;
  const bool plain = weight_decay_mode == kNoDecay && base.sign == 1.0f &&
                     base.box_lo == -std::numeric_limits<float>::infinity() &&
                     base.box_hi == std::numeric_limits<float>::infinity();

  // Work units never straddle tensors, and start on block boundaries of their tensor.
  chunk = (chunk + kBlock - 1) / kBlock * kBlock;
  std::vector<EncodedTensor> tensors(n_tensors);
  std::vector<EncodedScalars> scalars(n_tensors);
  struct Unit {
    int64_t tensor, begin, end;
  };
  std::vector<Unit> units;
  for (int64_t t = 0; t < n_tensors; ++t) {
    void* const* row = ptrs + t * 8;
    tensors[t] = EncodedTensor{row[0], row[1], row[2], row[3], row[4],
                               static_cast<float*>(row[5]), static_cast<float*>(row[6]),
                               static_cast<float*>(row[7])};
    const double* c = coef + t * EncodedCoef::size;
    scalars[t].k = base;
    scalars[t].k.numerator = float(c[EncodedCoef::numerator]);
    scalars[t].k.lower = float(c[EncodedCoef::lower]);
    scalars[t].k.upper = float(c[EncodedCoef::upper]);
    scalars[t].k.rate_scale = float(c[EncodedCoef::rate_scale]);
    const uint32_t seed = uint32_t(c[EncodedCoef::seed]);
    const uint32_t step = uint32_t(int64_t(c[EncodedCoef::step]));
    scalars[t].key_state = step_key(seed, step, kStreamState);
    scalars[t].key_param = step_key(seed, step, kStreamParam);
    scalars[t].coupled = coupled;
    scalars[t].plain = plain;
    for (int64_t b = 0; b < numels[t]; b += chunk) {
      units.push_back(Unit{t, b, b + chunk < numels[t] ? b + chunk : numels[t]});
    }
  }
  const int64_t n_units = int64_t(units.size());
  std::vector<double> partial(project ? 2 * n_units : 0);
  auto process = [&](int64_t u) {
    const Unit& unit = units[u];
    EncodedSums sums;
    if (project) sums.clear();
    fn(tensors[unit.tensor], unit.begin, unit.end, scalars[unit.tensor], unscale != 0,
       round_param != 0, project ? &sums : nullptr);
    if (project) sums.total(&partial[2 * u]);
  };
  for_each_unit(n_units, num_threads, process);
  if (project) add_partial_sums(partial, projection);
  return 0;
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float64, 2 bfloat16, 3 float16. ptrs: n_tensors rows of
// (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq). projection: null, or two doubles to
// which the step adds sum(d*d) and sum(d*g) over the elements it updates (d the Adam step
// before the bounds, per unit of the rate scale; dynabound.spec.StepTensors.projection).
// Returns 0 on success.
int dynabound_adabound_cpu(int dtype, int64_t n_tensors, void* const* ptrs, const int64_t* numels,
                           const double* coef, const double* hyper, int weight_decay_mode,
                           int amsbound, int unscale, int num_threads, int64_t chunk,
                           double* projection) {
  if (chunk <= 0) return 2;
  switch (dtype) {
    case 0:
      return run<float>(n_tensors, ptrs, numels, coef, hyper, weight_decay_mode, amsbound,
                        unscale, num_threads, chunk, projection);
    case 1:
      return run<double>(n_tensors, ptrs, numels, coef, hyper, weight_decay_mode, amsbound,
                         unscale, num_threads, chunk, projection);
    case 2:
      return run<BFloat16>(n_tensors, ptrs, numels, coef, hyper, weight_decay_mode, amsbound,
                           unscale, num_threads, chunk, projection);
#if DB_HAS_FLOAT16
    case 3:
      return run<_Float16>(n_tensors, ptrs, numels, coef, hyper, weight_decay_mode, amsbound,
                           unscale, num_threads, chunk, projection);
#endif
    default:
      return 1;
  }
}

// Moments in bfloat16 (state_format 0), 8 bits (1) or the parameter's dtype (2, for
// stochastically rounded bfloat16 parameters); dtype as above (float64 excluded).
// ptrs: n_tensors rows of (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, and the three
// float32 block-scale arrays, unused for bfloat16); coef rows: numerator, lower, upper,
// rate scale, the parameter's random seed (mod 2^32) and its step. projection as above.
// Returns 0 on success.
int dynabound_adabound_cpu_encoded(int dtype, int state_format, int64_t n_tensors,
                                   void* const* ptrs, const int64_t* numels, const double* coef,
                                   const double* hyper, int weight_decay_mode, int amsbound,
                                   int unscale, int round_param, int num_threads, int64_t chunk,
                                   double* projection) {
  if (chunk <= 0 || state_format < kStateBFloat16 || state_format > kStateParam) return 2;
  switch (dtype) {
    case 0:
      return run_encoded<float>(state_format, n_tensors, ptrs, numels, coef, hyper,
                                weight_decay_mode, amsbound, unscale, round_param, num_threads,
                                chunk, projection);
    case 2:
      return run_encoded<BFloat16>(state_format, n_tensors, ptrs, numels, coef, hyper,
                                   weight_decay_mode, amsbound, unscale, round_param,
                                   num_threads, chunk, projection);
#if DB_HAS_FLOAT16
    case 3:
      return run_encoded<_Float16>(state_format, n_tensors, ptrs, numels, coef, hyper,
                                   weight_decay_mode, amsbound, unscale, round_param,
                                   num_threads, chunk, projection);
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

// The names of the `hyper` array's (which 0), the `coef` rows' (1) and the encoded kernel's
// `coef` rows' (2) fields, in order, each followed by a comma.
const char* dynabound_layout(int which) {
#define DB_NAME(name) #name ","
  switch (which) {
    case 0: return DB_HYPER_LAYOUT(DB_NAME);
    case 1: return DB_COEF_LAYOUT(DB_NAME);
    case 2: return DB_ENCODED_COEF_LAYOUT(DB_NAME);
    default: return "";
  }
#undef DB_NAME
}

// Bit mask of the storage dtypes this build supports (bit i set: dtype code i).
int dynabound_supported_dtypes() { return 0x7 | (DB_HAS_FLOAT16 << 3); }

// The copy of the loops in use: 0 generic, 1 AVX2, 2 AVX-512.
int dynabound_vector_isa() { return vector_isa(); }

}  // extern "C"

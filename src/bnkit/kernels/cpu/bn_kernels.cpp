// bnkit's CPU batch-norm kernels (used by bnkit.functional under policy kernels="cpp").
//
// Operators (namespace bnkit, schemas at the end of this file):
//   bn_stats(x, float64, sample_weight?) -> (mean, var)
//                                         per-channel mean and biased variance (weighted),
//                                         one pass
//   bn_normalize(x, mean, scale, shift, relu)
//                                         y = act((x - mean_c) * scale_c + shift_c), one pass
//   bn_eval(x, mean, var, weight?, bias?, eps, relu)
//                                         y = act((x - mean_c) * gamma_c / sqrt(var_c + eps) + beta_c)
//                                         (autograd in C++: EvalFunction, via bn_eval_backward)
//   bn_eval_backward(dy, x, mean, var, weight?, eps, output?, param_grads)
//                                         -> (dx, dweight, dbias): dx = gamma invstd dy', and
//                                         the sums for dweight, dbias when param_grads
//   bn_train(x, weight?, bias?, eps, ghosts, strided, renorm_mean?, renorm_std?, rmin?, rmax?,
//            dmax?, relu, running_mean?, running_var?, momentum, sample_weight?,
//            num_batches_tracked?, guard, running_std?, renorm_momentum, biased)
//                                         -> (y, mean, var, r, d, updated)
//                                         training forward: statistics per (ghost, channel)
//                                         (weighted with sample_weight), batch-renorm r and d
//                                         from the ghost-averaged statistics, then
//                                         y = act(gamma (x_hat r + d) + beta); PyTorch's
//                                         running-statistics rule (or Keras' renorm rule with
//                                         running_std) applied to the buffers if given (and
//                                         the counter advanced); with guard, an
//                                         update that would leave a non-finite value is
//                                         skipped (updated = false). Autograd formula in C++
//                                         (TrainFunction).
//   bn_backward(dy, x, mean, invstd, weight?, grad_mean?, grad_var?, ghosts, strided, r?, d?,
//               output?, sample_weight?) -> (dx, dweight, dbias)
//                                         training backward: Σdy' and Σdy'·(x - mean) per
//                                         (ghost, channel), then dx; dy' = dy masked by
//                                         output > 0 when output (the ReLU's result) is given
//   bn_grad_sums(dy, x, mean, output?) -> (2, C) float64
//                                         the backward's sums alone, Σdy' and Σdy'·(x - mean)
//   bn_grad_apply(dy, x, mean, invstd, weight?, grad_mean, grad_var, count, output?,
//                 sample_weight?) -> dx
//                                         the backward's input gradient from statistics'
//                                         gradients summed over processes (synchronized layers)
//
// Layouts: channels on dim 1. A tensor is seen as "blocks" (n, C, inner) when it is contiguous
// (NCHW, NCL, NCDHW), or as "rows" (n, inner, C) when its channels are innermost (channels-last
// memory formats, 2-D (N, C) input, or contiguous input with inner == 1). Anything else is made
// contiguous first.
//
// Passes over memory. Blocks layout: tiles of adjacent channels sized for a core's cache
// (tile_channels); one task per tile computes the tile's statistics, walking the samples in
// memory order, then normalizes the tile while its values are still cached, so memory sees
// about one read and one write, as a copy. Otherwise (a channel too large for the cache, fewer
// channels than threads, sample weights, or the rows layout): a statistics pass, then the
// normalize pass. The backward is organised the same way (its sums need dy and x). Large
// outputs over long planes (large_long_planes) walk for their streamed output instead: the
// forward in two passes, the backward one channel per tile, counted by what it reads.
//
// Statistics: every value is shifted by K, the first value of its (ghost, channel) (the first with
// positive weight when weighted: masked-out padding may lie far from the data), so
// large-mean data does not cancel; runs of at most kChunk values are summed in the accumulation
// type (float for float32/bfloat16/float16 input, double for float64) and the run sums are added
// in double. Then mean = K + S1/n and var = S2/n - (S1/n)^2 in double (clamped at 0).
//
// Outputs of at least 1 MiB come from a small pool of blocks that bnkit's own outputs gave back
// (see OutputPool): a fresh block from the operating system costs a page fault per 4 KiB, which
// on large activations takes several times longer than the kernel itself.
//
// Threads: at::parallel_for (torch.get_num_threads()); inputs under 32768 values run on the
// calling thread.

#include <ATen/Dispatch.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/add.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/Allocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/autograd.h>
#include <torch/library.h>

// Streaming stores need x86-64 (which always has SSE2); elsewhere outputs use normal stores.
#if defined(__x86_64__) || defined(_M_X64)
#define BNKIT_X86_64 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf, for the L2 size (l2_bytes)
#endif

namespace bnkit_cpu {

constexpr int64_t kChunk = 2048;  // longest run summed in the accumulation type

// ------------------------------------------------------------------------------ output pool

// A cache of output blocks (at least kPoolMinBytes each), reused by exact size. Blocks return
// here when the tensors that own them are freed; at most `limit` bytes are kept (the oldest
// blocks are freed first). Allocations are reported to the PyTorch profiler like the default
// CPU allocator's, so memory profiles see them.
class OutputPool final : public c10::Allocator {
 public:
  static constexpr size_t kPoolMinBytes = size_t(1) << 20;

  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, c10::Device(c10::DeviceType::CPU)};  // e.g. resize_ to 0
    Block* b = take(n);
    if (b == nullptr) {
      void* p = nullptr;
      if (posix_memalign(&p, 64, n) != 0 || p == nullptr) {
        TORCH_CHECK(false, "bnkit: could not allocate ", n, " bytes");
      }
      b = new Block{p, n};
    }
    report(b->ptr, static_cast<int64_t>(n));
    return {b->ptr, b, &OutputPool::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = static_cast<size_t>(std::max<int64_t>(bytes, 0));
    trim_locked();
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

  int64_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(limit_);
  }

  static OutputPool& instance() {
    // Never destroyed: tensors may give blocks back during interpreter shutdown.
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  OutputPool() {
    const char* env = std::getenv("BNKIT_POOL_MIB");
    int64_t mib = 1024;
    if (env != nullptr && *env != '\0') mib = std::max<int64_t>(0, std::atoll(env));
    limit_ = static_cast<size_t>(mib) << 20;
  }

  Block* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if ((*it)->size == n) {
        Block* b = *it;
        free_.erase(std::next(it).base());
        cached_ -= n;
        live_ += n;
        return b;
      }
    }
    live_ += n;
    return nullptr;
  }

  static void give_back(void* ctx) {
    OutputPool& pool = instance();
    Block* b = static_cast<Block*>(ctx);
    pool.report(b->ptr, -static_cast<int64_t>(b->size));
    std::lock_guard<std::mutex> lock(pool.mutex_);
    pool.live_ -= b->size;
    pool.free_.push_back(b);
    pool.cached_ += b->size;
    pool.trim_locked();
  }

  void trim_locked() {
    while (cached_ > limit_ && !free_.empty()) {
      Block* old = free_.front();
      free_.pop_front();
      cached_ -= old->size;
      std::free(old->ptr);
      delete old;
    }
  }

  void report(void* ptr, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    size_t live, reserved;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live = live_;
      reserved = live_ + cached_;
    }
    c10::reportMemoryUsageToProfiler(ptr, delta, live, reserved,
                                     c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mutex_;
  std::deque<Block*> free_;
  size_t cached_ = 0;
  size_t live_ = 0;
  size_t limit_ = 0;
};

// An uninitialized tensor with t's sizes, strides and dtype (t is dense and non-overlapping).
static at::Tensor new_like(const at::Tensor& t) {
  const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  OutputPool& pool = OutputPool::instance();
  if (nbytes < OutputPool::kPoolMinBytes || pool.limit() == 0) {
    at::Tensor y = at::empty_like(t);
    TORCH_CHECK(y.strides() == t.strides(), "bnkit: unexpected output strides");
    return y;
  }
  return at::Tensor(at::detail::empty_strided_generic(
      t.sizes(), t.strides(), &pool, c10::DispatchKeySet(c10::DispatchKey::CPU),
      t.scalar_type()));
}

// ------------------------------------------------------------------------------ geometry

template <typename T>
struct Acc {
  using type = float;  // float32, bfloat16 and float16 input accumulate in float
};
template <>
struct Acc<double> {
  using type = double;
};

// Element conversions between the storage type T and the accumulation type A, written so that
// the loops around them vectorize. c10's own conversions keep those loops scalar: BFloat16's
// store branches on NaN, and Half converts one element at a time (F16C's scalar instruction or
// a portable routine). Here both are plain integer and float operations, exact as c10's:
// bfloat16 is the upper half of a float, stored with round-to-nearest-even and NaN as 0x7FC0;
// float16 is IEEE binary16, subnormals included, stored with round-to-nearest-even (a NaN as
// a quiet NaN of the same sign, payload dropped). 2 threads, 32x256x14x14, against the c10
// conversions: bfloat16 forward 0.95 -> 0.30 ms, backward 1.21 -> 0.38, eval 0.82 -> 0.17
// (PyTorch's kernels: 0.31 and 0.17). binary16 in software costs about 40 operations per 8
// values each way (GCC 12 vectorizes no _Float16 conversion); with F16C the hot float16 loops
// convert with it instead (see BNKIT_F16C below).
static inline float float_of_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t bits_of_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// binary16 -> binary32. Normal numbers (and inf/NaN): the exponent and mantissa fields moved
// into the float's places, with the exponent re-biased by adding 224 and multiplying by
// 2^-112 (an all-ones binary16 exponent lands on the float's all-ones one: inf or NaN).
// Subnormals (exponent field 0, value m·2^-24): the float 0.5 + m·2^-24, built by putting m
// into the low mantissa bits of 0.5, minus 0.5.
static inline float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t unsigned2 = w << 1;  // exponent and mantissa, the sign shifted out
  const float normal = float_of_bits((unsigned2 >> 4) + (uint32_t(224) << 23)) * 0x1.0p-112f;
  const float subnormal = float_of_bits((unsigned2 >> 17) | (uint32_t(126) << 23)) - 0.5f;
  const bool is_subnormal = unsigned2 < (uint32_t(1) << 27);
  return float_of_bits(sign | bits_of_float(is_subnormal ? subnormal : normal));
}

// binary32 -> binary16 with round-to-nearest-even: scaling |f| by 2^112 then 2^-110 saturates
// what overflows binary16 to inf and lets the float addition below do the rounding: adding a
// power of two chosen from f's exponent (at least 2^-14's, for subnormal results) leaves
// exactly binary16's mantissa bits in the sum's low bits.
static inline uint16_t float_to_half(float f) {
  const uint32_t w = bits_of_float(f);
  const uint32_t unsigned2 = w << 1;
  const uint32_t sign = (w & 0x80000000u) >> 16;
  float scaled = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t exponent = std::max<uint32_t>(unsigned2 & 0xFF000000u, 0x71000000u);
  scaled += float_of_bits((exponent >> 1) + 0x07800000u);
  const uint32_t bits = bits_of_float(scaled);
  const uint32_t finite = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>(sign | (unsigned2 > 0xFF000000u ? 0x7E00u : finite));
}

static inline uint16_t float_to_bfloat16(float f) {
  const uint32_t u = bits_of_float(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
}

template <typename A, typename T>
static inline A widen(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return static_cast<A>(float_of_bits(static_cast<uint32_t>(v.x) << 16));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<A>(half_to_float(v.x));
  } else {
    return static_cast<A>(v);
  }
}

template <typename T, typename A>
static inline T narrow(A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return c10::BFloat16(float_to_bfloat16(static_cast<float>(v)), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::Half(float_to_half(static_cast<float>(v)), c10::Half::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// float16 through F16C, eight values per instruction: the normalize/inference pass converts in
// registers (half_affine); the dx pass converts its run in pieces of kHalfPiece values to
// float32, works on that, and converts the result back (by_half_pieces). The software
// conversions above cost about 40 operations per eight values each way. Same values: both are
// exact and round to nearest even (NaN payloads aside). The sums convert in pieces too: per
// run (NCHW), or per block of rows and piece of channels (the rows layout,
// by_half_row_blocks). The weighted row sums keep the software conversion.
#if defined(BNKIT_X86_64) && defined(__F16C__)
#define BNKIT_F16C 1
constexpr bool kHalfPieces = true;
#else
constexpr bool kHalfPieces = false;
#endif
constexpr int64_t kHalfPiece = 256;

static inline void halves_to_floats(const c10::Half* p, float* f, int64_t n) {
  int64_t i = 0;
#if defined(BNKIT_F16C)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) f[i] = half_to_float(p[i].x);
}

static inline void floats_to_halves(const float* f, c10::Half* p, int64_t n) {
  int64_t i = 0;
#if defined(BNKIT_F16C)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), h);
  }
#endif
  for (; i < n; ++i) p[i] = c10::Half(float_to_half(f[i]), c10::Half::from_bits());
}

// q = act((p - m)·a + b) over the first multiple of 8 of len float16 values, converted in
// registers (F16C); returns how many values it did (the caller's loop does the rest). m, a and
// b are one value each, or with Spread one per value (a row's channels). The same operations
// as the float loop: a subtraction, then one fused multiply-add, as GCC contracts
// `(x - m) * a + b` there.
template <bool Relu, bool Spread>
static inline int64_t half_affine(const c10::Half* p, c10::Half* q, int64_t len, const float* m,
                                  const float* a, const float* b) {
#if defined(BNKIT_F16C) && defined(__FMA__)
  // One value each: broadcast once (with Spread these are not read; a row may be empty).
  const __m256 m0 = Spread ? _mm256_setzero_ps() : _mm256_set1_ps(*m);
  const __m256 a0 = Spread ? _mm256_setzero_ps() : _mm256_set1_ps(*a);
  const __m256 b0 = Spread ? _mm256_setzero_ps() : _mm256_set1_ps(*b);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
    const __m256 vm = Spread ? _mm256_loadu_ps(m + i) : m0;
    const __m256 va = Spread ? _mm256_loadu_ps(a + i) : a0;
    const __m256 vb = Spread ? _mm256_loadu_ps(b + i) : b0;
    __m256 v = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtph_ps(h), vm), va, vb);
    if constexpr (Relu) v = _mm256_max_ps(v, _mm256_setzero_ps());
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  return i;
#else
  return 0;
#endif
}

// f(in, out, offset, count) over pieces of a float16 run of len values: `in` holds the run's
// values from `src` as float32, and `out`, written by f, goes back to `dst` as float16.
template <typename F>
static inline void by_half_pieces(const c10::Half* src, c10::Half* dst, int64_t len, F&& f) {
  float in[kHalfPiece], out[kHalfPiece];
  for (int64_t at = 0; at < len; at += kHalfPiece) {
    const int64_t count = std::min(kHalfPiece, len - at);
    halves_to_floats(src + at, in, count);
    f(in, out, at, count);
    floats_to_halves(out, dst + at, count);
  }
}

struct Geometry {
  at::Tensor x;     // the tensor the kernels read (the input, or a contiguous copy)
  bool rows;        // true: memory (n, inner, C); false: memory (n, C, inner)
  int64_t n, c, inner;
  int64_t ghosts = 1;    // ghost (virtual) batches, each normalized by its own statistics
  bool strided = false;  // ghost g holds samples g, g + G, ... (Keras) instead of a block
  // Sample weights (the same for every channel): per sample (n values) or per position
  // (n·inner values, a mask), in the accumulation type; `totals` holds, per ghost batch,
  // their sum over the values of one channel, the count that weighted statistics divide by.
  at::Tensor w;
  bool per_sample = true;
  std::vector<double> totals;
  // Per ghost, the index (sample·inner + position) of its first value with positive weight:
  // the statistics' shift K. A masked-out value (padding, often 0) can lie thousands of
  // standard deviations from the data, and shifting by it would cancel the float32 sums.
  std::vector<int64_t> anchors;

  bool weighted() const { return w.defined(); }
  // The weight of value `i` of the run of sample s that starts at position `pos`.
  template <typename A>
  const A* weights_at(int64_t s, int64_t pos) const {
    return w.const_data_ptr<A>() + (per_sample ? s : s * inner + pos);
  }
  // Values (or total weight) per channel of ghost gh: what its statistics divide by.
  double denominator(int64_t gh) const {
    return weighted() ? totals[gh] : static_cast<double>(count());
  }

  int64_t per_ghost() const { return n / ghosts; }
  int64_t sample(int64_t g, int64_t k) const {
    return strided ? g + k * ghosts : g * per_ghost() + k;
  }
  int64_t ghost_of(int64_t s) const { return strided ? s % ghosts : s / per_ghost(); }
  int64_t count() const { return per_ghost() * inner; }  // values per (ghost, channel)
  // Offset of (ghost, channel)'s first value (with positive weight, when weighted).
  int64_t first(int64_t g, int64_t ch) const {
    const int64_t at = anchors.empty() ? sample(g, 0) * inner : anchors[g];
    const int64_t s = at / inner, pos = at % inner;
    return rows ? at * c + ch : (s * c + ch) * inner + pos;
  }
};

static Geometry geometry_of(const at::Tensor& input, int64_t ghosts = 1, bool strided = false) {
  TORCH_CHECK(input.dim() >= 2, "bnkit: expected input with at least 2 dims, got ",
              input.dim());
  Geometry g;
  g.c = input.size(1);
  g.n = input.size(0);
  const int64_t numel = input.numel();
  g.inner = (g.n == 0 || g.c == 0) ? 0 : numel / (g.n * g.c);
  TORCH_CHECK(ghosts >= 1, "bnkit: ghosts must be >= 1, got ", ghosts);
  TORCH_CHECK(g.n % ghosts == 0, "bnkit: batch of ", g.n, " samples does not split into ",
              ghosts, " ghost batches");
  g.ghosts = ghosts;
  g.strided = strided;
  if (input.is_contiguous()) {
    g.x = input;
    g.rows = g.inner == 1;  // (N, C) or (N, C, 1, ...): vectorize over C
    return g;
  }
  if (input.movedim(1, -1).is_contiguous()) {
    g.x = input;
    g.rows = true;
    return g;
  }
  g.x = input.contiguous();
  g.rows = g.inner == 1;
  return g;
}

// Attaches sample weights (per sample: n values; a mask: n·inner values, in the order of the
// samples and then the positions of one channel) to the geometry, in the accumulation type.
static void attach_weights(Geometry& g, const std::optional<at::Tensor>& weights,
                           bool require_positive = true) {
  if (!weights.has_value() || !weights->defined()) return;
  const int64_t numel = weights->numel();
  TORCH_CHECK(numel == g.n || numel == g.n * g.inner, "bnkit: sample_weight must have ", g.n,
              " (per sample) or ", g.n * g.inner, " (per position) values, got shape ",
              weights->sizes());
  const auto acc = g.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  g.w = weights->to(acc).contiguous().view({-1});
  g.per_sample = numel == g.n;
  // Each ghost batch's total weight per channel: its samples' weights (times the positions
  // per sample when one weight covers a whole sample).
  g.totals.assign(g.ghosts, 0.0);
  g.anchors.assign(g.ghosts, -1);
  AT_DISPATCH_FLOATING_TYPES(g.w.scalar_type(), "bnkit_weight_total", [&] {
    const scalar_t* p = g.w.const_data_ptr<scalar_t>();
    const int64_t per = g.per_sample ? 1 : g.inner;
    const double scale = g.per_sample ? static_cast<double>(g.inner) : 1.0;
    for (int64_t gh = 0; gh < g.ghosts; ++gh) {
      for (int64_t k = 0; k < g.per_ghost(); ++k) {  // the ghost's samples in order
        const int64_t smp = g.sample(gh, k);
        double sum = 0;
        for (int64_t j = 0; j < per; ++j) {
          const double wj = static_cast<double>(p[smp * per + j]);
          sum += wj;
          if (g.anchors[gh] < 0 && wj > 0) g.anchors[gh] = smp * g.inner + (g.per_sample ? 0 : j);
        }
        g.totals[gh] += sum * scale;
      }
      if (g.anchors[gh] < 0) g.anchors[gh] = g.sample(gh, 0) * g.inner;  // no positive weight
    }
  });
  for (const double total : g.totals) {
    // Not for a pass that divides by a total over several processes (bn_grad_apply).
    if (!require_positive) break;
    TORCH_CHECK_VALUE(total > 0,
                      "the sample weights sum to zero (or less) over the reduced dimensions",
                      g.ghosts > 1 ? " of a ghost batch" : "",
                      ", so the weighted mean is undefined. Fix: 1) check the mask is not all "
                      "zeros for this batch, 2) skip the batch, or 3) use weights > 0.");
  }
}

static void check_input(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "bnkit: CPU tensors only");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "bnkit: float32, float64, bfloat16 or float16 input, got ", dtype);
}

// The dtype of statistics and per-channel results: float32 for half input.
static at::ScalarType stats_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

static void check_vector(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.numel() == numel, "bnkit: ", name, " must have ", numel, " values, got shape ",
              t.sizes());
}

static bool has(const std::optional<at::Tensor>& t);

// q[i] = p[i] in q's type (a helper: omp simd cannot stand inside AT_DISPATCH's lambda).
template <typename S, typename T>
static void converted(const S* p, T* q, size_t n) {
#pragma omp simd
  for (size_t i = 0; i < n; ++i) q[i] = static_cast<T>(p[i]);
}

// Values of a tensor as a contiguous std::vector<T> (empty when t is absent), read in place
// (no conversion tensors: these are per-call costs on small inputs).
template <typename T>
static std::vector<T> values_of(const std::optional<at::Tensor>& t) {
  if (!has(t)) return {};
  const at::Tensor c = t->is_contiguous() ? *t : t->contiguous();
  std::vector<T> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bnkit_values", [&] {
    // Built from the converted values instead of zeroed and then overwritten: with many
    // ghosts these are ghosts × C values (16 × 1024 for a 2-D input in 16 ghosts).
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    out.assign(p, p + c.numel());
  });
  return out;
}

// An uninitialized array of n values, for per-(ghost, channel) scratch that is written whole
// before it is read (std::vector would zero it first: with many ghosts as many bytes as a 2-D
// input).
template <typename V>
static std::unique_ptr<V[]> scratch(int64_t n) {
  return std::unique_ptr<V[]>(new V[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

// A 1-D or 2-D tensor of dtype `dtype` holding the `count` values at `values`.
static at::Tensor tensor_of(const double* values, size_t count, at::IntArrayRef shape,
                            at::ScalarType dtype) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  TORCH_CHECK(static_cast<size_t>(t.numel()) == count, "bnkit: internal size mismatch");
  if (dtype == at::kDouble) {
    std::copy(values, values + count, t.data_ptr<double>());
  } else {
    TORCH_CHECK(dtype == at::kFloat, "bnkit: internal dtype ", dtype);
    float* p = t.data_ptr<float>();
#pragma omp simd
    for (size_t i = 0; i < count; ++i) p[i] = static_cast<float>(values[i]);
  }
  return t;
}

static at::Tensor tensor_of(const std::vector<double>& values, at::IntArrayRef shape,
                            at::ScalarType dtype) {
  return tensor_of(values.data(), values.size(), shape, dtype);
}

static bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Below kSerialValues values a pass runs on the calling thread, as PyTorch's kernels do below
// their grain size: waking the other threads costs more than the work, and far more when
// another process holds a core (an OpenMP barrier then waits for the descheduled thread).
constexpr int64_t kSerialValues = 32768;

template <typename F>
static void parallel(const Geometry& g, int64_t begin, int64_t end, int64_t grain, F&& f) {
  if (g.x.numel() < kSerialValues) {
    if (begin < end) f(begin, end);
    return;
  }
  at::parallel_for(begin, end, grain, f);
}

static int num_threads() { return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads()); }

// Channels per tile when a training pass works tile by tile: a tile is a group of adjacent
// channels whose values, with the other tensors read and the output written (`tensors` + 1
// streams), fit in a core's cache, so the second pass over the tile (normalize, or dx) reads
// the cache instead of memory. Within a tile the samples are walked in memory order: for
// each sample the tile's channels are one contiguous run of k·inner values, long enough for
// the hardware prefetcher even when inner is 7x7. 0: no tiling (the channels-last/2-D
// layouts, a channel too large for the cache, or too few channels to keep every thread busy).
constexpr int64_t kTileBytes = int64_t(1) << 20;

// The L2 cache of one core in bytes, or 0 where the system does not say.
static int64_t l2_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE  // glibc; elsewhere the one-channel tiles stay off
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t(0);
#else
    return int64_t(0);
#endif
  }();
  return bytes;
}

// A channel too large for kTileBytes may still be a tile of its own when the pass streams its
// output past the cache: then only what it reads has to stay cached, kStreamTileShare of a
// core's L2 at most (see large_long_planes).
constexpr double kStreamTileShare = 0.875;

// `tensors`: the tensors the pass reads (x; dy and, with the ReLU, y in backward).
// `own_tiles`: whether a channel too large for kTileBytes may be a tile of its own.
static int64_t tile_channels(const Geometry& g, int64_t tensors, bool own_tiles = false) {
  const int64_t t = num_threads();
  // Weights per position (masks) take the two-pass route; per-sample weights scale a run.
  if (g.rows || g.c < t || (g.weighted() && !g.per_sample)) return 0;
  const int64_t bytes = g.n * g.inner * g.x.element_size();  // one channel of one tensor
  const int64_t per_channel = bytes * (tensors + 1);
  if (per_channel > kTileBytes) {
    // One channel per tile only when the channels split evenly over the threads: the two-pass
    // route it replaces is balanced (16 threads on 24 one-channel tiles would leave 4 idle).
    const double reads = static_cast<double>(bytes * tensors);
    const bool fits = reads <= kStreamTileShare * static_cast<double>(l2_bytes());
    return own_tiles && fits && g.c % t == 0 ? 1 : 0;
  }
  // Enough tiles for every thread (a multiple of the thread count), each within the budget.
  const int64_t fit = std::max<int64_t>(1, kTileBytes / per_channel);
  int64_t tiles = t;
  while ((g.c + tiles - 1) / tiles > fit) tiles += t;
  return (g.c + tiles - 1) / tiles;
}

// Runs tile(c0, c1) over the tiles of k channels in parallel.
template <typename F>
static void for_each_tile(const Geometry& g, int64_t k, F&& tile) {
  const int64_t tiles = (g.c + k - 1) / k;
  parallel(g, 0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) tile(i * k, std::min(g.c, (i + 1) * k));
  });
}
// f(offset, length, ghost, channel) for every run of channels [c0, c1), samples in memory order.
template <typename F>
static void for_each_tile_run(const Geometry& g, int64_t c0, int64_t c1, F&& f) {
  for (int64_t s = 0; s < g.n; ++s) {
    const int64_t gh = g.ghost_of(s);
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t base = (s * g.c + ch) * g.inner;
      for (int64_t off = 0; off < g.inner; off += kChunk) {
        f(base + off, std::min(kChunk, g.inner - off), gh, ch);
      }
    }
  }
}

// Tiles of short channels (inner below kShortInner, e.g. 7x7 maps) are walked one sample at a
// time as a single run over the tile's (c1 - c0)·inner values, with the per-channel constants
// spread over that run: one vector loop per sample instead of one short loop per (sample,
// channel), whose set-up and horizontal sums cost as much as its values. Measured on
// 128x512x7x7: training forward 1.7x -> 1.5x the time of a copy; on 14x14 maps the spread
// constants' extra loads cost more than they save (1.35x -> 1.5x), hence the bound. The spread
// arrays hold one run per ghost batch, so with small ghosts they grow towards the size of the
// input (128x512x7x7 in 16 ghosts of 8: forward 0.86 -> 0.99 ms): at least kSpreadSamples
// samples per ghost (the arrays then stay within an eighth of the values). A sample's run with
// its spread constants is exactly one row of the rows layout (len values, one constant each),
// so the row loops (shifted_row_sums, affine_row, grad_row_sums, grad_row) serve it.
constexpr int64_t kShortInner = 64;
constexpr int64_t kSpreadSamples = 32;

static bool short_runs(const Geometry& g) {
  return g.inner < kShortInner && g.per_ghost() >= kSpreadSamples;
}

// Per-(channel, ghost) values of a tile, indexed (ch - c0)·ghosts + gh, spread over the
// tile's sample run: element gh·len + (ch - c0)·inner + j holds the (ch, gh) value.
template <typename A>
static std::vector<A> spread(const Geometry& g, const std::vector<A>& pairs, int64_t k) {
  const int64_t len = k * g.inner;
  std::vector<A> out(g.ghosts * len);
  for (int64_t gh = 0; gh < g.ghosts; ++gh) {
    for (int64_t ch = 0; ch < k; ++ch) {
      std::fill_n(out.begin() + gh * len + ch * g.inner, g.inner, pairs[ch * g.ghosts + gh]);
    }
  }
  return out;
}

// Sums over the samples of a tile with short channels: run(offset, q1, q2, gh) adds one
// sample's run of len = (c1 - c0)·inner values into the ghost's element-wise accumulators q1,
// q2 (accumulation type); these are folded into s1, s2 (double, indexed (ch - c0)·ghosts + gh)
// every kChunk samples and at the end, so no value is summed with more than kChunk others in
// the accumulation type (the precision rule of every other pass).
template <typename A, typename F>
static void tile_run_sums(const Geometry& g, int64_t c0, int64_t c1, std::vector<double>& s1,
                          std::vector<double>& s2, F&& run) {
  const int64_t k = c1 - c0, len = k * g.inner, gs = g.ghosts;
  std::vector<A> q1(gs * len, A(0)), q2(gs * len, A(0));
  auto fold = [&]() {
    for (int64_t gh = 0; gh < gs; ++gh) {
      for (int64_t ch = 0; ch < k; ++ch) {
        const int64_t at = gh * len + ch * g.inner;
        double a1 = 0, a2 = 0;
        for (int64_t j = 0; j < g.inner; ++j) {
          a1 += static_cast<double>(q1[at + j]);
          a2 += static_cast<double>(q2[at + j]);
        }
        s1[ch * gs + gh] += a1;
        s2[ch * gs + gh] += a2;
      }
    }
    std::fill(q1.begin(), q1.end(), A(0));
    std::fill(q2.begin(), q2.end(), A(0));
  };
  for (int64_t s = 0; s < g.n; ++s) {
    const int64_t gh = g.ghost_of(s);
    run((s * g.c + c0) * g.inner, q1.data() + gh * len, q2.data() + gh * len, gh);
    if ((s + 1) % kChunk == 0) fold();
  }
  if (g.n % kChunk != 0) fold();
}

// f(offset, gh) for every sample of the tile [c0, c1) (its run of (c1 - c0)·inner values).
template <typename F>
static void for_each_sample_run(const Geometry& g, int64_t c0, F&& f) {
  for (int64_t s = 0; s < g.n; ++s) f((s * g.c + c0) * g.inner, g.ghost_of(s));
}

// Whether the rows layout sums each ghost batch in one task (two or more ghosts, at least one
// per thread). row_sums() and ghost_local() both ask here: the per-ghost sums and the
// per-thread sums (ThreadSums) differ in their last bits, and the two routes of a pass must
// give the same bits.
static bool ghost_per_task(const Geometry& g) {
  return g.ghosts > 1 && g.ghosts >= num_threads();
}

// Rows layout: pieces of at most `run` rows that stay within one ghost.
struct RowPiece {
  int64_t ghost, begin, end;
};

// Rows per piece: at most kChunk (the precision rule) and about 64K values.
static int64_t row_run(const Geometry& g) {
  return std::max<int64_t>(1, std::min<int64_t>(kChunk, 65536 / std::max<int64_t>(g.c, 1)));
}

static std::vector<RowPiece> row_pieces(const Geometry& g) {
  const int64_t run = row_run(g);  // local_ghost_sums() cuts contiguous ghosts the same way
  std::vector<RowPiece> pieces;
  auto split = [&](int64_t ghost, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r += run) pieces.push_back({ghost, r, std::min(end, r + run)});
  };
  if (g.ghosts == 1 || !g.strided) {
    const int64_t rows_per_ghost = g.per_ghost() * g.inner;
    for (int64_t gh = 0; gh < g.ghosts; ++gh) {
      split(gh, gh * rows_per_ghost, (gh + 1) * rows_per_ghost);
    }
  } else {
    for (int64_t s = 0; s < g.n; ++s) split(g.ghost_of(s), s * g.inner, (s + 1) * g.inner);
  }
  return pieces;
}

// Per-thread float64 partial sums of (ghost, channel) pairs: each thread adds into its own slot
// (indexed by at::get_thread_num()) and total() adds the slots up in a fixed order, so the
// result does not depend on scheduling. Inside another parallel region parallel_for runs
// inline on the caller's thread: one slot then.
class ThreadSums {
 public:
  explicit ThreadSums(int64_t width)
      : nested_(at::in_parallel_region()),
        threads_(nested_ ? 1 : std::max(1, at::get_num_threads())),
        width_(width),
        t1_(static_cast<size_t>(threads_) * width, 0.0),
        t2_(t1_.size(), 0.0) {}

  int threads() const { return threads_; }

  // The calling thread's two slots (width values each).
  std::pair<double*, double*> slot() {
    const int tid = nested_ ? 0 : at::get_thread_num();
    TORCH_CHECK(tid >= 0 && tid < threads_, "bnkit: unexpected thread id ", tid);
    const size_t at = static_cast<size_t>(tid) * width_;
    return {t1_.data() + at, t2_.data() + at};
  }

  // body(begin, end) over [0, count), in parallel unless nested (or the input is small).
  template <typename F>
  void run(const Geometry& g, int64_t count, F&& body) {
    if (nested_) {
      body(0, count);
    } else {
      parallel(g, 0, count, 1, body);
    }
  }

  void total(double* s1, double* s2) const {
    for (int64_t i = 0; i < width_; ++i) {
      double u1 = 0, u2 = 0;
      for (int t = 0; t < threads_; ++t) {
        u1 += t1_[static_cast<size_t>(t) * width_ + i];
        u2 += t2_[static_cast<size_t>(t) * width_ + i];
      }
      s1[i] = u1;
      s2[i] = u2;
    }
  }

 private:
  bool nested_;
  int threads_;
  int64_t width_;
  std::vector<double> t1_, t2_;
};

// One ghost's sums over the rows layout into d1, d2 (C doubles each, written whole): piece
// at(j) of `count` is summed by piece(q1, q2, begin, end, ghost) into the accumulation-type
// arrays q1, q2 (C values each), which are then stored (the first piece: no zeroing) or added
// in double. Every path that sums a ghost's rows goes through here, so they agree bit for bit.
template <typename A, typename PieceAt, typename F>
static void ghost_sums(int64_t cc, int64_t count, PieceAt&& at, A* q1, A* q2, double* d1,
                       double* d2, F&& piece) {
  for (int64_t j = 0; j < count; ++j) {
    const RowPiece p = at(j);
    std::fill(q1, q1 + cc, A(0));
    std::fill(q2, q2 + cc, A(0));
    piece(q1, q2, p.begin, p.end, p.ghost);
    if (j == 0) {
#pragma omp simd
      for (int64_t ch = 0; ch < cc; ++ch) {
        d1[ch] = q1[ch];
        d2[ch] = q2[ch];
      }
    } else {
#pragma omp simd
      for (int64_t ch = 0; ch < cc; ++ch) {
        d1[ch] += q1[ch];
        d2[ch] += q2[ch];
      }
    }
  }
  if (count == 0) {  // a ghost without rows (no values): zero sums
    std::fill(d1, d1 + cc, 0.0);
    std::fill(d2, d2 + cc, 0.0);
  }
}

// Sums per (ghost, channel) over the rows layout: piece(q1, q2, begin, end, ghost) adds its
// rows into the accumulation-type arrays q1, q2 (C values each); the pieces' sums are added in
// double per thread, then over threads, into s1, s2 (ghosts * C values).
template <typename A, typename F>
static void row_sums(const Geometry& g, double* s1, double* s2, F&& piece) {
  const std::vector<RowPiece> pieces = row_pieces(g);
  const int64_t cc = g.c, width = g.ghosts * cc;
  if (ghost_per_task(g)) {
    // One task per ghost, adding its pieces straight into its own slot: no per-thread copies
    // of the (ghosts, C) sums to zero and add up.
    std::vector<std::vector<int64_t>> of_ghost(g.ghosts);
    for (int64_t i = 0; i < static_cast<int64_t>(pieces.size()); ++i) {
      of_ghost[pieces[i].ghost].push_back(i);
    }
    parallel(g, 0, g.ghosts, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> q1(cc), q2(cc);
      for (int64_t gh = begin; gh < end; ++gh) {
        const std::vector<int64_t>& mine = of_ghost[gh];
        ghost_sums<A>(
            cc, static_cast<int64_t>(mine.size()), [&](int64_t j) { return pieces[mine[j]]; },
            q1.data(), q2.data(), s1 + gh * cc, s2 + gh * cc, piece);
      }
    });
    return;
  }
  ThreadSums sums(width);
  sums.run(g, static_cast<int64_t>(pieces.size()), [&](int64_t begin, int64_t end) {
    auto [t1, t2] = sums.slot();
    std::vector<A> q1(cc), q2(cc);
    for (int64_t i = begin; i < end; ++i) {
      const RowPiece& p = pieces[i];
      std::fill(q1.begin(), q1.end(), A(0));
      std::fill(q2.begin(), q2.end(), A(0));
      piece(q1.data(), q2.data(), p.begin, p.end, p.ghost);
      double* d1 = t1 + p.ghost * cc;
      double* d2 = t2 + p.ghost * cc;
      for (int64_t ch = 0; ch < cc; ++ch) {
        d1[ch] += q1[ch];
        d2[ch] += q2[ch];
      }
    }
  });
  sums.total(s1, s2);
}

template <typename A, typename F>
static void block_sums_by_run(const Geometry& g, double* s1, double* s2, F&& run);

// Sums per (ghost, channel) over the blocks layout, in memory order: each thread takes whole
// samples and adds every (channel, run) sum into its own float64 partials, which are added
// over threads at the end. With fewer samples than a few per thread, per-(sample, channel,
// run) tasks instead (one sample of a huge image still spreads over every thread).
template <typename A, typename F>
static void block_sums(const Geometry& g, double* s1, double* s2, F&& run) {
  if (g.n < 4 * num_threads()) {
    block_sums_by_run<A>(g, s1, s2, run);
    return;
  }
  const int64_t cc = g.c;
  ThreadSums sums(g.ghosts * cc);
  sums.run(g, g.n, [&](int64_t begin, int64_t end) {
    auto [t1, t2] = sums.slot();
    for (int64_t s = begin; s < end; ++s) {
      const int64_t gh = g.ghost_of(s);
      double* d1 = t1 + gh * cc;
      double* d2 = t2 + gh * cc;
      for (int64_t ch = 0; ch < cc; ++ch) {
        const int64_t base = (s * cc + ch) * g.inner;
        for (int64_t off = 0; off < g.inner; off += kChunk) {
          A a1 = 0, a2 = 0;
          run(a1, a2, base + off, std::min(kChunk, g.inner - off), gh, ch);
          d1[ch] += a1;
          d2[ch] += a2;
        }
      }
    }
  });
  sums.total(s1, s2);
}

// Sums per (ghost, channel) over the blocks layout with few samples: per-(sample, channel,
// run) partial sums in parallel, then added per (ghost, channel) in double.
template <typename A, typename F>
static void block_sums_by_run(const Geometry& g, double* s1, double* s2, F&& run) {
  const int64_t runs = (g.inner + kChunk - 1) / kChunk;
  const int64_t tasks = g.n * g.c * runs;
  std::vector<double> p1(tasks), p2(tasks);
  parallel(g, 0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t % runs, block = t / runs;  // block = sample * C + channel
      const int64_t ch = block % g.c, s = block / g.c;
      A a1 = 0, a2 = 0;
      run(a1, a2, block * g.inner + j * kChunk, std::min(kChunk, g.inner - j * kChunk),
          g.ghost_of(s), ch);
      p1[t] = a1;
      p2[t] = a2;
    }
  });
  for (int64_t gh = 0; gh < g.ghosts; ++gh) {
    for (int64_t ch = 0; ch < g.c; ++ch) {
      double u1 = 0, u2 = 0;
      for (int64_t k = 0; k < g.per_ghost(); ++k) {
        const int64_t base = (g.sample(gh, k) * g.c + ch) * runs;
        for (int64_t j = 0; j < runs; ++j) {
          u1 += p1[base + j];
          u2 += p2[base + j];
        }
      }
      s1[gh * g.c + ch] = u1;
      s2[gh * g.c + ch] = u2;
    }
  }
}

// ------------------------------------------------------------------------------ streaming stores

// Outputs of at least this many bytes (16 MiB unless set_stream_threshold says otherwise) are
// written with non-temporal (streaming) stores, which skip the read of each destination cache
// line that a normal store makes first, and leave no dirty lines for the next operation to
// write back: on a 48 MiB activation the elementwise pass then moves two thirds of the bytes.
// Smaller outputs keep normal stores: the next layer may still find them in cache (streaming
// made 6-12 MiB channels-last outputs 10-30% slower to produce and read back).
constexpr int64_t kStreamBytes = int64_t(16) << 20;
static std::atomic<int64_t> stream_threshold{kStreamBytes};
#if defined(BNKIT_X86_64)
constexpr bool kCanStream = true;
#else
constexpr bool kCanStream = false;  // no streaming stores: a buffered copy would only cost
#endif

static bool streams_bytes(size_t bytes) {
  return kCanStream &&
         static_cast<int64_t>(bytes) >= stream_threshold.load(std::memory_order_relaxed);
}

static bool streams(const at::Tensor& out) { return streams_bytes(out.nbytes()); }

// Large outputs (kStreamBytes or more, streamed by default) over long planes (at least
// kStreamTilePlane bytes per sample and channel, so that a sample's run in a one-channel tile
// is one long read) change the best walk, measured with 2 threads on a 2 MiB L2: the backward
// (x and dy read, dx streamed) does better with a channel too large for kTileBytes as a tile
// of its own (64x64x56x56 5.3-5.4 -> 4.9 ms, 32x128x56x56 5.3-5.5 -> 4.4-4.5 ms; 28x28 planes
// keep the old walk: 256x64x28x28 was slower, 5.0 -> 5.9 ms), and the forward (x read) does
// better without tiles, in two streaming passes (32x128x56x56 4.9 -> 3.1 ms; with 28x28
// planes its tiles win, 128x128x28x28 3.1 -> 2.7 ms). The rule reads the size, not the
// threshold, so set_stream_threshold changes the stores but never the walk, and with it the
// order of the sums.
constexpr int64_t kStreamTilePlane = int64_t(8) << 10;

static bool large_long_planes(const Geometry& g) {
  return !g.rows && g.x.nbytes() >= static_cast<size_t>(kStreamBytes) &&
         g.inner * g.x.element_size() >= kStreamTilePlane;
}

// Copies `bytes` (a multiple of 64) from src to dst (both 64-byte aligned) with streaming stores.
static inline void stream_lines(void* dst, const void* src, size_t bytes) {
#if defined(BNKIT_X86_64) && defined(__AVX512F__)
  auto* d = static_cast<__m512i*>(dst);
  const auto* p = static_cast<const __m512i*>(src);
  for (size_t i = 0; i < bytes / 64; ++i) _mm512_stream_si512(d + i, _mm512_load_si512(p + i));
#elif defined(BNKIT_X86_64) && defined(__AVX__)
  auto* d = static_cast<__m256i*>(dst);
  const auto* p = static_cast<const __m256i*>(src);
  for (size_t i = 0; i < bytes / 32; ++i) _mm256_stream_si256(d + i, _mm256_load_si256(p + i));
#elif defined(BNKIT_X86_64)
  auto* d = static_cast<__m128i*>(dst);
  const auto* p = static_cast<const __m128i*>(src);
  for (size_t i = 0; i < bytes / 16; ++i) _mm_stream_si128(d + i, _mm_load_si128(p + i));
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Orders this thread's streaming stores before whatever follows (the end of a parallel pass).
static inline void stream_fence() {
#if defined(BNKIT_X86_64)
  _mm_sfence();
#endif
}

// Writes `len` outputs at `out`: compute(dst, at, count) fills dst with outputs [at, at + count).
// With `stream`, and `out` and the run's bytes whole cache lines, the values go through a
// 4 KiB buffer that stays in L1 and then to memory with streaming stores; otherwise compute
// writes `out` directly.
template <typename T, typename F>
static inline void write_run(bool stream, T* out, int64_t len, F&& compute) {
  const auto bytes = static_cast<uintptr_t>(len) * sizeof(T);
  if (!stream || ((reinterpret_cast<uintptr_t>(out) | bytes) & 63) != 0) {
    compute(out, int64_t(0), len);
    return;
  }
  constexpr int64_t kBuffer = 4096 / sizeof(T);
  alignas(64) T buffer[kBuffer];
  for (int64_t at = 0; at < len; at += kBuffer) {
    const int64_t count = std::min(kBuffer, len - at);
    compute(buffer, at, count);
    stream_lines(out + at, buffer, static_cast<size_t>(count) * sizeof(T));
  }
}

// Elementwise pass over the whole tensor: f(offset, length, ghost, channel) for blocks runs;
// r(row, ghost) or r(row, ghost, sample) for rows.
template <typename FB, typename FR>
static void for_all(const Geometry& g, FB&& block_run, FR&& row) {
  if (g.rows) {
    const int64_t rows = g.n * g.inner;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.c, 1));
    parallel(g, 0, rows, grain, [&](int64_t begin, int64_t end) {
      // The row's sample and ghost are stepped, not divided out per row (two integer
      // divisions cost as much as a row of 16 channels).
      int64_t pos = begin % g.inner, s = begin / g.inner;
      int64_t gh = s < g.n ? g.ghost_of(s) : 0;
      for (int64_t r = begin; r < end; ++r) {
        if constexpr (std::is_invocable_v<FR&, int64_t, int64_t, int64_t>) {
          row(r, gh, s);  // the row's sample too (per-sample weights)
        } else {
          row(r, gh);
        }
        if (++pos < g.inner) continue;
        pos = 0;
        if (++s < g.n) gh = g.ghost_of(s);
      }
      stream_fence();
    });
    return;
  }
  const int64_t runs = (g.inner + kChunk - 1) / kChunk;
  const int64_t tasks = g.n * g.c * runs;
  parallel(g, 0, tasks, 1, [&](int64_t begin, int64_t end) {
    // Task t is run j of block (sample s, channel ch); the indices are stepped, not divided
    // out per task: with 7x7 maps a task is 49 values, and five integer divisions cost as much.
    int64_t j = begin % runs, block = begin / runs;
    int64_t ch = block % g.c, s = block / g.c;
    int64_t gh = s < g.n ? g.ghost_of(s) : 0;
    for (int64_t t = begin; t < end; ++t) {
      block_run(block * g.inner + j * kChunk, std::min(kChunk, g.inner - j * kChunk), gh, ch);
      if (++j < runs) continue;
      j = 0;
      ++block;
      if (++ch < g.c) continue;
      ch = 0;
      if (++s < g.n) gh = g.ghost_of(s);
    }
    stream_fence();
  });
}

// f(o) for each ghost's row of (ghost, channel) values, o = ghost·C, ghosts in parallel (about
// 4096 values per task). The callers loop over the C channels of a row: contiguous, so their
// square roots and divisions vectorize.
template <typename F>
static void for_each_ghost_row(const Geometry& g, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(g.c, 1));
  parallel(g, 0, g.ghosts, grain, [&](int64_t begin, int64_t end) {
    for (int64_t gh = begin; gh < end; ++gh) f(gh * g.c);
  });
}

// ------------------------------------------------------------------------------ inner loops

template <typename T, typename A>
static inline void shifted_sums(const T* p, int64_t len, A k, A& s1, A& s2) {
  if constexpr (std::is_same_v<T, c10::Half> && kHalfPieces) {
    float in[kHalfPiece];
    for (int64_t at = 0; at < len; at += kHalfPiece) {
      const int64_t count = std::min(kHalfPiece, len - at);
      halves_to_floats(p + at, in, count);
      shifted_sums<float, A>(in, count, k, s1, s2);
    }
    return;
  }
  A a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
  for (int64_t i = 0; i < len; ++i) {
    const A d = widen<A>(p[i]) - k;
    a1 += d;
    a2 += d * d;
  }
  s1 += a1;
  s2 += a2;
}

template <typename T, typename A, bool Relu>
static inline void grad_sums(const T* x, const T* dy, const T* y, int64_t len, A m, A& s1, A& s2) {
  if constexpr (std::is_same_v<T, c10::Half> && kHalfPieces) {
    float xs[kHalfPiece], dys[kHalfPiece], ys[kHalfPiece];
    for (int64_t at = 0; at < len; at += kHalfPiece) {
      const int64_t count = std::min(kHalfPiece, len - at);
      halves_to_floats(x + at, xs, count);
      halves_to_floats(dy + at, dys, count);
      if constexpr (Relu) halves_to_floats(y + at, ys, count);
      grad_sums<float, A, Relu>(xs, dys, Relu ? ys : dys, count, m, s1, s2);
    }
    return;
  }
  A a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
  for (int64_t i = 0; i < len; ++i) {
    A gi = widen<A>(dy[i]);
    if constexpr (Relu) gi = widen<A>(y[i]) > A(0) ? gi : A(0);
    a1 += gi;
    a2 += gi * (widen<A>(x[i]) - m);
  }
  s1 += a1;
  s2 += a2;
}

template <typename T, typename A, bool Relu>
static inline void affine_run(const T* p, T* q, int64_t len, A m, A a, A b) {
  int64_t start = 0;
  if constexpr (std::is_same_v<T, c10::Half> && kHalfPieces) {
    // The pass that inference is made of: converted in registers, eight at a time; the last
    // few values (fewer than eight) take the loop below.
    start = half_affine<Relu, false>(p, q, len, &m, &a, &b);
  }
#pragma omp simd
  for (int64_t i = start; i < len; ++i) {
    A v = (widen<A>(p[i]) - m) * a + b;
    if constexpr (Relu) v = v > A(0) ? v : A(0);
    q[i] = narrow<T>(v);
  }
}

template <typename T, typename A, bool Relu>
static inline void affine_row(const T* p, T* q, int64_t cc, const A* m, const A* a, const A* b) {
  int64_t start = 0;
  if constexpr (std::is_same_v<T, c10::Half> && kHalfPieces) {
    start = half_affine<Relu, true>(p, q, cc, m, a, b);
  }
#pragma omp simd
  for (int64_t ch = start; ch < cc; ++ch) {
    A v = (widen<A>(p[ch]) - m[ch]) * a[ch] + b[ch];
    if constexpr (Relu) v = v > A(0) ? v : A(0);
    q[ch] = narrow<T>(v);
  }
}

// gx = a·dy' + b·(x - m) + d
template <typename T, typename A, bool Relu>
static inline void grad_run(const T* x, const T* dy, const T* y, T* gx, int64_t len, A m, A a,
                            A b, A d) {
  if constexpr (std::is_same_v<T, c10::Half> && kHalfPieces) {
    float dys[kHalfPiece], ys[kHalfPiece];
    by_half_pieces(x, gx, len, [&](const float* in, float* out, int64_t at, int64_t count) {
      halves_to_floats(dy + at, dys, count);
      if constexpr (Relu) halves_to_floats(y + at, ys, count);
      grad_run<float, A, Relu>(in, dys, Relu ? ys : dys, out, count, m, a, b, d);
    });
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    A gi = widen<A>(dy[i]);
    if constexpr (Relu) gi = widen<A>(y[i]) > A(0) ? gi : A(0);
    gx[i] = narrow<T>(a * gi + b * (widen<A>(x[i]) - m) + d);
  }
}

template <typename T, typename A, bool Relu>
static inline void grad_row(const T* x, const T* dy, const T* y, T* gx, int64_t cc, const A* m,
                            const A* a, const A* b, const A* d) {
  if constexpr (std::is_same_v<T, c10::Half> && kHalfPieces) {
    float dys[kHalfPiece], ys[kHalfPiece];
    by_half_pieces(x, gx, cc, [&](const float* in, float* out, int64_t at, int64_t count) {
      halves_to_floats(dy + at, dys, count);
      if constexpr (Relu) halves_to_floats(y + at, ys, count);
      grad_row<float, A, Relu>(in, dys, Relu ? ys : dys, out, count, m + at, a + at, b + at,
                               d + at);
    });
    return;
  }
#pragma omp simd
  for (int64_t ch = 0; ch < cc; ++ch) {
    A gi = widen<A>(dy[ch]);
    if constexpr (Relu) gi = widen<A>(y[ch]) > A(0) ? gi : A(0);
    gx[ch] = narrow<T>(a[ch] * gi + b[ch] * (widen<A>(x[ch]) - m[ch]) + d[ch]);
  }
}

// The weights of consecutive rows (sample-major positions) of the rows layout, stepped rather
// than divided out per row: w[sample] per sample, w[row] per position.
template <typename A>
class RowWeights {
 public:
  RowWeights(const Geometry& g, int64_t row)
      : w_(g.w.const_data_ptr<A>()), per_sample_(g.per_sample), inner_(g.inner),
        row_(row), sample_(row / g.inner), pos_(row % g.inner) {}
  A next() {
    const A value = per_sample_ ? w_[sample_] : w_[row_];
    ++row_;
    if (++pos_ == inner_) {
      pos_ = 0;
      ++sample_;
    }
    return value;
  }

 private:
  const A* w_;
  bool per_sample_;
  int64_t inner_, row_, sample_, pos_;
};

// Adds rows [begin, end) of the (rows, cc) array x, shifted by k, into q1 (Σ w·d) and q2
// (Σ w·d²), d = x - k, with w = 1 or, when Weighted, each row's weight from `weights`: four rows
// per update of the accumulators, which are then stored a quarter as often.
template <typename T, typename A, bool Weighted>
static void summed_rows(const T* x, int64_t cc, int64_t begin, int64_t end, const A* k,
                        RowWeights<A>* weights, A* q1, A* q2) {
  auto next = [&]() { return Weighted ? weights->next() : A(1); };
  int64_t r = begin;
  for (; r + 4 <= end; r += 4) {
    const A w0 = next(), w1 = next(), w2 = next(), w3 = next();
    const T* p0 = x + r * cc;
    const T *p1 = p0 + cc, *p2 = p1 + cc, *p3 = p2 + cc;
#pragma omp simd
    for (int64_t ch = 0; ch < cc; ++ch) {
      const A d0 = widen<A>(p0[ch]) - k[ch], d1 = widen<A>(p1[ch]) - k[ch];
      const A d2 = widen<A>(p2[ch]) - k[ch], d3 = widen<A>(p3[ch]) - k[ch];
      if constexpr (Weighted) {
        const A e0 = w0 * d0, e1 = w1 * d1, e2 = w2 * d2, e3 = w3 * d3;
        q1[ch] += (e0 + e1) + (e2 + e3);
        q2[ch] += (e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3);
      } else {
        q1[ch] += (d0 + d1) + (d2 + d3);
        q2[ch] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
      }
    }
  }
  for (; r < end; ++r) {
    const T* p = x + r * cc;
    const A w = next();
#pragma omp simd
    for (int64_t ch = 0; ch < cc; ++ch) {
      const A d = widen<A>(p[ch]) - k[ch];
      if constexpr (Weighted) {
        q1[ch] += w * d;
        q2[ch] += w * d * d;
      } else {
        q1[ch] += d;
        q2[ch] += d * d;
      }
    }
  }
}

// For float16, rows [begin, end) in blocks of kHalfRows rows by pieces of channels, converted
// to float32 first: f(block, width, rows, at) with the block's rows `width` floats apart. The
// blocks start at `begin`, kHalfRows (a multiple of the row loops' 4 and 2) apart, so the
// float loops group the rows as they do on the whole range.
constexpr int64_t kHalfRows = 4;

template <typename F>
static inline void by_half_row_blocks(const c10::Half* x, int64_t cc, int64_t begin, int64_t end,
                                      float* block, F&& f) {
  for (int64_t at = 0; at < cc; at += kHalfPiece) {
    const int64_t width = std::min(kHalfPiece, cc - at);
    for (int64_t r = begin; r < end; r += kHalfRows) {
      const int64_t rows = std::min(kHalfRows, end - r);
      for (int64_t i = 0; i < rows; ++i) {
        halves_to_floats(x + (r + i) * cc + at, block + i * width, width);
      }
      f(r, width, rows, at);
    }
  }
}

template <typename T, typename A>
static void shifted_row_sums(const T* x, int64_t cc, int64_t begin, int64_t end, const A* k,
                             A* q1, A* q2) {
  if constexpr (std::is_same_v<T, c10::Half> && kHalfPieces) {
    float xs[kHalfRows * kHalfPiece];
    by_half_row_blocks(x, cc, begin, end, xs, [&](int64_t, int64_t width, int64_t rows,
                                                   int64_t at) {
      summed_rows<float, A, false>(xs, width, 0, rows, k + at, nullptr, q1 + at, q2 + at);
    });
    return;
  }
  summed_rows<T, A, false>(x, cc, begin, end, k, nullptr, q1, q2);
}

// Adds rows [begin, end) of Σdy' and Σdy'·(x - m) into q1, q2 (dy' = dy, or masked by y > 0).
template <typename T, typename A, bool Relu>
static void grad_row_sums(const T* x, const T* dy, const T* y, int64_t cc, int64_t begin,
                          int64_t end, const A* m, A* q1, A* q2) {
  if constexpr (std::is_same_v<T, c10::Half> && kHalfPieces) {
    float xs[kHalfRows * kHalfPiece], dys[kHalfRows * kHalfPiece], ys[kHalfRows * kHalfPiece];
    by_half_row_blocks(x, cc, begin, end, xs, [&](int64_t r, int64_t width, int64_t rows,
                                                   int64_t at) {
      for (int64_t i = 0; i < rows; ++i) {
        halves_to_floats(dy + (r + i) * cc + at, dys + i * width, width);
        if constexpr (Relu) halves_to_floats(y + (r + i) * cc + at, ys + i * width, width);
      }
      grad_row_sums<float, A, Relu>(xs, dys, Relu ? ys : dys, width, 0, rows, m + at, q1 + at,
                                    q2 + at);
    });
    return;
  }
  auto grad = [&](int64_t i) {
    A gi = widen<A>(dy[i]);
    if constexpr (Relu) gi = widen<A>(y[i]) > A(0) ? gi : A(0);
    return gi;
  };
  int64_t r = begin;
  for (; r + 2 <= end; r += 2) {
    const int64_t o0 = r * cc, o1 = o0 + cc;
#pragma omp simd
    for (int64_t ch = 0; ch < cc; ++ch) {
      const A g0 = grad(o0 + ch), g1 = grad(o1 + ch);
      q1[ch] += g0 + g1;
      q2[ch] += g0 * (widen<A>(x[o0 + ch]) - m[ch]) + g1 * (widen<A>(x[o1 + ch]) - m[ch]);
    }
  }
  for (; r < end; ++r) {
    const int64_t o = r * cc;
#pragma omp simd
    for (int64_t ch = 0; ch < cc; ++ch) {
      const A gi = grad(o + ch);
      q1[ch] += gi;
      q2[ch] += gi * (widen<A>(x[o + ch]) - m[ch]);
    }
  }
}

// Σ w·(x - k) and Σ w·(x - k)² of a run with one weight per value.
template <typename T, typename A>
static inline void masked_sums(const T* p, const A* w, int64_t len, A k, A& s1, A& s2) {
  A a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
  for (int64_t i = 0; i < len; ++i) {
    const A d = widen<A>(p[i]) - k;
    a1 += w[i] * d;
    a2 += w[i] * d * d;
  }
  s1 += a1;
  s2 += a2;
}

// Adds one row of channels, weighted by w, into q1 (Σ w·d) and q2 (Σ w·d²), d = x - k.
template <typename T, typename A>
static inline void weighted_row_sums(const T* p, int64_t cc, const A* k, A w, A* q1, A* q2) {
#pragma omp simd
  for (int64_t ch = 0; ch < cc; ++ch) {
    const A d = widen<A>(p[ch]) - k[ch];
    q1[ch] += w * d;
    q2[ch] += w * d * d;
  }
}

// gx = a·dy' + w·(b·(x - m) + d): the weighted backward's elementwise pass, one weight per
// value (masks); the per-sample and per-row cases scale b and d instead.
template <typename T, typename A, bool Relu>
static inline void masked_grad_run(const T* x, const T* dy, const T* y, const A* w, T* gx,
                                   int64_t len, A m, A a, A b, A d) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    A gi = widen<A>(dy[i]);
    if constexpr (Relu) gi = widen<A>(y[i]) > A(0) ? gi : A(0);
    gx[i] = narrow<T>(a * gi + w[i] * (b * (widen<A>(x[i]) - m) + d));
  }
}

// grad_row with every correction term scaled by the row's weight w.
template <typename T, typename A, bool Relu>
static inline void weighted_grad_row(const T* x, const T* dy, const T* y, T* gx, int64_t cc,
                                     const A* m, const A* a, const A* b, const A* d, A w) {
#pragma omp simd
  for (int64_t ch = 0; ch < cc; ++ch) {
    A gi = widen<A>(dy[ch]);
    if constexpr (Relu) gi = widen<A>(y[ch]) > A(0) ? gi : A(0);
    gx[ch] = narrow<T>(a[ch] * gi + w * (b[ch] * (widen<A>(x[ch]) - m[ch]) + d[ch]));
  }
}

// mean = K + S1·(1/n), var = S2·(1/n) - (S1·(1/n))^2 (clamped at 0), in double; inv = 1/n,
// computed once per ghost by the caller (one division instead of two per channel).
static inline void finish_stats(double k, double s1, double s2, double inv, double& mean,
                                double& var) {
  const double d = s1 * inv;
  mean = k + d;
  var = std::max(s2 * inv - d * d, 0.0);
}

// finish_stats() for one ghost's C channels (shifts k, sums s1, s2; count values or weight).
// mean and var may be s1 and s2 themselves.
template <typename A>
static inline void finish_ghost(int64_t cc, const A* k, const double* s1, const double* s2,
                                double count, double* mean, double* var) {
  const double inv = 1.0 / count;
#pragma omp simd
  for (int64_t ch = 0; ch < cc; ++ch) {
    finish_stats(static_cast<double>(k[ch]), s1[ch], s2[ch], inv, mean[ch], var[ch]);
  }
}

// Adds rows [begin, end) of the rows layout, shifted by the ghost's k, into q1, q2: Σ w·d and
// Σ w·d², with each row's sample weight when weighted (w = 1 otherwise).
template <typename T, typename A>
static void row_piece_sums(const Geometry& g, const T* x, int64_t begin, int64_t end, const A* k,
                           A* q1, A* q2) {
  if (g.weighted()) {
    RowWeights<A> weights(g, begin);
    summed_rows<T, A, true>(x, g.c, begin, end, k, &weights, q1, q2);
  } else {
    shifted_row_sums<T, A>(x, g.c, begin, end, k, q1, q2);
  }
}

// ------------------------------------------------------------------------------ statistics

// Mean and biased variance per (ghost, channel) into mean, var (ghosts * C doubles).
template <typename T>
static void statistics(const Geometry& g, const T* x, double* mean, double* var) {
  using A = typename Acc<T>::type;
  const int64_t cc = g.c, width = g.ghosts * cc;
  // Every element of k, s1 and s2 is written below: no zeroing (with many ghosts these are
  // as large as a 2-D input).
  const auto k = scratch<A>(width);
  for (int64_t gh = 0; gh < g.ghosts; ++gh) {
    const int64_t first = g.first(gh, 0), step = g.rows ? 1 : g.inner;
    for (int64_t ch = 0; ch < cc; ++ch) k[gh * cc + ch] = widen<A>(x[first + ch * step]);
  }
  const auto s1 = scratch<double>(width), s2 = scratch<double>(width);
  if (g.rows) {
    row_sums<A>(g, s1.get(), s2.get(), [&](A* q1, A* q2, int64_t begin, int64_t end, int64_t gh) {
      row_piece_sums<T, A>(g, x, begin, end, k.get() + gh * cc, q1, q2);
    });
  } else if (!g.weighted()) {
    block_sums<A>(g, s1.get(), s2.get(),
                  [&](A& a1, A& a2, int64_t off, int64_t len, int64_t gh, int64_t ch) {
                    shifted_sums<T, A>(x + off, len, k[gh * cc + ch], a1, a2);
                  });
  } else {
    const int64_t plane = cc * g.inner;
    block_sums<A>(g, s1.get(), s2.get(),
                  [&](A& a1, A& a2, int64_t off, int64_t len, int64_t gh, int64_t ch) {
                    const A kk = k[gh * cc + ch];
                    const int64_t smp = off / plane, pos = off % g.inner;
                    if (g.per_sample) {
                      // One weight for the whole run: it factors out of both sums.
                      A b1 = 0, b2 = 0;
                      shifted_sums<T, A>(x + off, len, kk, b1, b2);
                      const A ws = *g.weights_at<A>(smp, pos);
                      a1 += ws * b1;
                      a2 += ws * b2;
                    } else {
                      masked_sums<T, A>(x + off, g.weights_at<A>(smp, pos), len, kk, a1, a2);
                    }
                  });
  }
  for (int64_t gh = 0; gh < g.ghosts; ++gh) {
    const int64_t o = gh * cc;
    finish_ghost(cc, k.get() + o, s1.get() + o, s2.get() + o, g.denominator(gh), mean + o,
                 var + o);
  }
}

// ------------------------------------------------------------------------------ coefficients

// The per-channel affine and batch renormalization of the training forward.
struct Affine {
  std::vector<double> weight, bias;             // empty: γ = 1, β = 0
  std::vector<double> renorm_mean, renorm_std;  // empty: no renorm
  std::optional<double> rmin, rmax, dmax;
  double eps = 1e-5;

  bool renorm() const { return !renorm_std.empty(); }
  double gamma(int64_t ch) const { return weight.empty() ? 1.0 : weight[ch]; }
  double beta(int64_t ch) const { return bias.empty() ? 0.0 : bias[ch]; }
};

// Batch renormalization's r and d for one channel from its ghost-averaged mean mu and biased
// variance v: r = sqrt(v + eps)/s, d = (mu - renorm_mean)/s, s = max(renorm_std, sqrt(eps)),
// clipped to [rmin, rmax] and [-dmax, dmax]. An absent clip is an infinite bound, which leaves
// every value (NaN too) as it is, so the clips need no branch and renorm_all()'s loop
// vectorizes.
static inline void renorm_rd(const Affine& f, int64_t ch, double mu, double v, double& r,
                             double& d) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  const double denom = std::max(f.renorm_std[ch], std::sqrt(f.eps));
  const double dmax = f.dmax.value_or(inf);
  r = std::min(std::max(std::sqrt(v + f.eps) / denom, f.rmin.value_or(-inf)),
               f.rmax.value_or(inf));
  d = std::min(std::max((mu - f.renorm_mean[ch]) / denom, -dmax), dmax);
}

// Batch renormalization's r and d for channel ch, from the ghost-averaged statistics (1 and 0
// without renorm).
static std::pair<double, double> renorm_factors(const Affine& f, int64_t ghosts, int64_t cc,
                                                int64_t ch, const double* mean,
                                                const double* var) {
  double r = 1.0, d = 0.0;
  if (f.renorm()) {
    double mu = 0, v = 0;
    for (int64_t gh = 0; gh < ghosts; ++gh) {
      mu += mean[gh * cc + ch];
      v += var[gh * cc + ch];
    }
    renorm_rd(f, ch, mu / static_cast<double>(ghosts), v / static_cast<double>(ghosts), r, d);
  }
  return {r, d};
}

// The normalize's scale a = γ·r / sqrt(σ² + eps) from gr = γ·r, rounded to the accumulation
// type first: the square root and division then run in float32 for float32 and half input
// (eight lanes per instruction instead of four; within 2 float32 ulp).
template <typename A>
static inline A scale_of(A gr, double var, double eps) {
  return gr / std::sqrt(static_cast<A>(var + eps));
}

// y = (x - m)·a + b for channel ch of a ghost whose statistics are mean, var.
template <typename A>
static void coefficient(const Affine& f, int64_t ch, double r, double d, double mean, double var,
                        A& m, A& a, A& b) {
  const double gamma = f.gamma(ch);
  m = static_cast<A>(mean);
  a = scale_of<A>(static_cast<A>(gamma * r), var, f.eps);
  b = static_cast<A>(gamma * d + f.beta(ch));
}

// For channel ch: r and d (renorm; 1 and 0 otherwise) and, per ghost gh, y = (x - m)·a + b.
template <typename A>
static void forward_coefficients(const Affine& f, int64_t ghosts, int64_t cc, int64_t ch,
                                 const double* mean, const double* var, A* m, A* a, A* b,
                                 double* r_out, double* d_out) {
  const auto [r, d] = renorm_factors(f, ghosts, cc, ch, mean, var);
  if (r_out != nullptr) {
    r_out[ch] = r;
    d_out[ch] = d;
  }
  for (int64_t gh = 0; gh < ghosts; ++gh) {
    const int64_t i = gh * cc + ch;
    coefficient<A>(f, ch, r, d, mean[i], var[i], m[gh], a[gh], b[gh]);
  }
}

// ------------------------------------------------------------------------------ forward

// renorm_factors() for all C channels at once (into r, d): the ghost averages, then
// renorm_rd(), each in a loop that vectorizes (one call per channel, with its square root,
// divisions and clips, took as long as a pass over a 256x1024 input). The same operations in
// the same order, so the same bits.
static void renorm_all(const Affine& f, int64_t ghosts, int64_t cc, const double* mean,
                       const double* var, double* r, double* d) {
  std::vector<double> mu(cc, 0.0), v(cc, 0.0);
  double* const pm = mu.data();
  double* const pv = v.data();
  for (int64_t gh = 0; gh < ghosts; ++gh) {
    const double* const m = mean + gh * cc;
    const double* const s = var + gh * cc;
#pragma omp simd
    for (int64_t ch = 0; ch < cc; ++ch) {
      pm[ch] += m[ch];
      pv[ch] += s[ch];
    }
  }
  const double gs = static_cast<double>(ghosts);
#pragma omp simd
  for (int64_t ch = 0; ch < cc; ++ch) renorm_rd(f, ch, pm[ch] / gs, pv[ch] / gs, r[ch], d[ch]);
}

// Per channel γ·r and γ·d + β into gr, gb, the factors that ghost_coefficients() applies to
// every ghost: with renorm, r and d (C values each) are computed first from the ghosts'
// statistics; without it r = 1 and d = 0, and neither mean, var, r nor d is read.
static void channel_factors(const Affine& f, int64_t ghosts, int64_t cc, const double* mean,
                            const double* var, double* r, double* d, double* gr, double* gb) {
  const bool renorm = f.renorm();
  if (renorm) {
    TORCH_INTERNAL_ASSERT(r != nullptr && d != nullptr, "bnkit: renorm needs r and d");
    renorm_all(f, ghosts, cc, mean, var, r, d);
  }
  for (int64_t ch = 0; ch < cc; ++ch) {
    const double rc = renorm ? r[ch] : 1.0, dc = renorm ? d[ch] : 0.0;
    gr[ch] = f.gamma(ch) * rc;
    gb[ch] = f.gamma(ch) * dc + f.beta(ch);
  }
}

// One ghost's m and a of y = (x - m)·a + b for its C channels, as coefficient() computes them
// with γ·r hoisted (gr, in the accumulation type): contiguous, so the square roots and
// divisions vectorize. b = γ·d + β is the same for every ghost (channel_factors()' gb).
template <typename A>
static inline void ghost_coefficients(int64_t cc, const double* mean, const double* var,
                                      const A* gr, double eps, A* m, A* a) {
#pragma omp simd
  for (int64_t ch = 0; ch < cc; ++ch) {
    m[ch] = static_cast<A>(mean[ch]);
    a[ch] = scale_of<A>(gr[ch], var[ch], eps);
  }
}

// channel_factors()' per-channel values in the accumulation type.
template <typename A>
static std::vector<A> in_acc(const std::vector<double>& v) {
  return std::vector<A>(v.begin(), v.end());
}

// finish_ghost() and ghost_coefficients() in one loop, from one piece's sums q1, q2 in the
// accumulation type (exact in double, so the same values as the two loops over ghost_sums()'
// double copies) and gr = γ·r already in the accumulation type: mean and var (double) for the
// outputs, m and a for the normalize.
template <typename A>
static inline void finish_ghost_coefficients(int64_t cc, const A* k, const A* q1, const A* q2,
                                             double count, const A* gr, double eps,
                                             double* mean, double* var, A* m, A* a) {
  const double inv = 1.0 / count;
#pragma omp simd
  for (int64_t ch = 0; ch < cc; ++ch) {
    double mu, v;
    finish_stats(static_cast<double>(k[ch]), static_cast<double>(q1[ch]),
                 static_cast<double>(q2[ch]), inv, mu, v);
    mean[ch] = mu;
    var[ch] = v;
    m[ch] = static_cast<A>(mu);
    a[ch] = scale_of<A>(gr[ch], v, eps);
  }
}

// Rows layout in contiguous ghost batches (virtual_batch_size with ghost_layout="contiguous")
// small enough for a core's cache, at least one per thread (2-D input, channels-last input in
// small ghosts): each ghost is then a tile of its own. A task takes whole ghosts and, per
// ghost, sums its rows, finishes its statistics and coefficients, and makes its second pass
// (normalize, or dx) while the rows are still cached. The two-pass route instead stores
// (ghosts × C) coefficient arrays between the passes and reads three of them back with every
// row (16 ghosts of 256x1024: 192 KiB of coefficients, three values per input value).
static bool ghost_local(const Geometry& g, int64_t tensors) {
  if (!g.rows || g.strided || !ghost_per_task(g)) return false;
  const int64_t ghost_bytes = g.per_ghost() * g.inner * g.c * g.x.element_size();
  return ghost_bytes * (tensors + 1) <= kTileBytes;
}

// One ghost's sums over its own rows (ghost_local()), cut into pieces of row_run() rows from
// the ghost's first row: exactly as row_pieces() cuts a contiguous ghost (the two must agree
// for the same bits); see ghost_sums().
template <typename A, typename F>
static void local_ghost_sums(const Geometry& g, int64_t gh, A* q1, A* q2, double* d1,
                             double* d2, F&& piece) {
  const int64_t rows = g.per_ghost() * g.inner, r0 = gh * rows, run = row_run(g);
  auto at = [&](int64_t j) {
    return RowPiece{gh, r0 + j * run, std::min(r0 + rows, r0 + (j + 1) * run)};
  };
  ghost_sums<A>(g.c, (rows + run - 1) / run, at, q1, q2, d1, d2, piece);
}

// Forward of ghost_local() geometries, without renorm (its r and d need every ghost first):
// the same sums, statistics and coefficients as the two-pass route, so the same bits.
template <typename T, bool Relu>
static void ghost_local_forward(const Geometry& g, const Affine& f, T* y, bool stream,
                                double* mean, double* var) {
  using A = typename Acc<T>::type;
  const T* x = g.x.const_data_ptr<T>();
  const int64_t cc = g.c, rows = g.per_ghost() * g.inner;
  std::vector<double> gr(cc), gb(cc);  // no renorm here: mean and var are not read yet
  channel_factors(f, g.ghosts, cc, mean, var, nullptr, nullptr, gr.data(), gb.data());
  const std::vector<A> gr_a = in_acc<A>(gr), b = in_acc<A>(gb);  // b: the same for every ghost
  const bool one_piece = rows <= row_run(g);
  parallel(g, 0, g.ghosts, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> k(cc), q1(cc), q2(cc), m(cc), a(cc);
    for (int64_t gh = begin; gh < end; ++gh) {
      const int64_t r0 = gh * rows, r1 = r0 + rows, first = g.first(gh, 0);
      for (int64_t ch = 0; ch < cc; ++ch) k[ch] = widen<A>(x[first + ch]);
      double* mg = mean + gh * cc;
      double* vg = var + gh * cc;
      if (one_piece) {
        // The ghost's rows are one piece: its sums are q1, q2 themselves (ghost_sums() would
        // store them in double unchanged), finished with the coefficients in one loop.
        std::fill(q1.begin(), q1.end(), A(0));
        std::fill(q2.begin(), q2.end(), A(0));
        row_piece_sums<T, A>(g, x, r0, r1, k.data(), q1.data(), q2.data());
        finish_ghost_coefficients<A>(cc, k.data(), q1.data(), q2.data(), g.denominator(gh),
                                     gr_a.data(), f.eps, mg, vg, m.data(), a.data());
      } else {
        // The sums go into mean and var and are finished in place.
        local_ghost_sums<A>(g, gh, q1.data(), q2.data(), mg, vg,
                            [&](A* p1, A* p2, int64_t lo, int64_t hi, int64_t) {
                              row_piece_sums<T, A>(g, x, lo, hi, k.data(), p1, p2);
                            });
        finish_ghost(cc, k.data(), mg, vg, g.denominator(gh), mg, vg);
        ghost_coefficients<A>(cc, mg, vg, gr_a.data(), f.eps, m.data(), a.data());
      }
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t o = row * cc;
        write_run(stream, y + o, cc, [&](T* out, int64_t at, int64_t count) {
          affine_row<T, A, Relu>(x + o + at, out, count, m.data() + at, a.data() + at,
                                 b.data() + at);
        });
      }
    }
    stream_fence();
  });
}

template <typename T, bool Relu>
static void train_forward(const Geometry& g, const Affine& f, T* y, bool stream, double* mean,
                          double* var, double* r, double* d) {
  using A = typename Acc<T>::type;
  const T* x = g.x.const_data_ptr<T>();
  const int64_t cc = g.c, gs = g.ghosts;
  if (const int64_t k = large_long_planes(g) ? 0 : tile_channels(g, 1); k > 0) {
    for_each_tile(g, k, [&](int64_t c0, int64_t c1) {
      const int64_t w = (c1 - c0) * gs;  // (channel, ghost) pairs of the tile
      std::vector<A> shift(w), m(w), a(w), b(w);
      std::vector<double> s1(w, 0.0), s2(w, 0.0);
      for (int64_t ch = c0; ch < c1; ++ch) {
        for (int64_t gh = 0; gh < gs; ++gh) {
          shift[(ch - c0) * gs + gh] = widen<A>(x[g.first(gh, ch)]);
        }
      }
      const int64_t len = (c1 - c0) * g.inner, plane = cc * g.inner;
      if (short_runs(g)) {
        const std::vector<A> ks = spread(g, shift, c1 - c0);
        tile_run_sums<A>(g, c0, c1, s1, s2, [&](int64_t off, A* q1, A* q2, int64_t gh) {
          const A* k = ks.data() + gh * len;
          if (g.weighted()) {
            // A row of len values, each with its own shift, all with the sample's weight.
            weighted_row_sums<T, A>(x + off, len, k, *g.weights_at<A>(off / plane, 0), q1, q2);
          } else {
            shifted_row_sums<T, A>(x + off, len, 0, 1, k, q1, q2);  // one row of len
          }
        });
      } else {
        for_each_tile_run(g, c0, c1, [&](int64_t off, int64_t n, int64_t gh, int64_t ch) {
          const int64_t i = (ch - c0) * gs + gh;
          A a1 = 0, a2 = 0;
          shifted_sums<T, A>(x + off, n, shift[i], a1, a2);
          // One weight for the whole run: it factors out of both sums.
          const A ws = g.weighted() ? *g.weights_at<A>(off / plane, 0) : A(1);
          s1[i] += ws * a1;
          s2[i] += ws * a2;
        });
      }
      for (int64_t ch = c0; ch < c1; ++ch) {
        for (int64_t gh = 0; gh < gs; ++gh) {
          const int64_t i = (ch - c0) * gs + gh;
          finish_stats(static_cast<double>(shift[i]), s1[i], s2[i], 1.0 / g.denominator(gh),
                       mean[gh * cc + ch],
                       var[gh * cc + ch]);
        }
        const int64_t i0 = (ch - c0) * gs;
        forward_coefficients<A>(f, gs, cc, ch, mean, var, m.data() + i0, a.data() + i0,
                                b.data() + i0, r, d);
      }
      if (short_runs(g)) {
        const std::vector<A> ms = spread(g, m, c1 - c0), as = spread(g, a, c1 - c0),
                             bs = spread(g, b, c1 - c0);
        for_each_sample_run(g, c0, [&](int64_t off, int64_t gh) {
          const int64_t at = gh * len;
          write_run(stream, y + off, len, [&](T* out, int64_t k, int64_t count) {
            affine_row<T, A, Relu>(x + off + k, out, count, ms.data() + at + k,
                                   as.data() + at + k, bs.data() + at + k);
          });
        });
        stream_fence();
        return;
      }
      for_each_tile_run(g, c0, c1, [&](int64_t off, int64_t n, int64_t gh, int64_t ch) {
        const int64_t i = (ch - c0) * gs + gh;
        write_run(stream, y + off, n, [&](T* out, int64_t k, int64_t count) {
          affine_run<T, A, Relu>(x + off + k, out, count, m[i], a[i], b[i]);
        });
      });
      stream_fence();
    });
    return;
  }
  if (!f.renorm() && ghost_local(g, 1)) {
    ghost_local_forward<T, Relu>(g, f, y, stream, mean, var);
    return;
  }
  statistics<T>(g, x, mean, var);
  // Renorm's r and d per channel first (they need every ghost), then the (ghosts × C)
  // coefficients one ghost's C values at a time (with 16 ghosts of a 2-D input a scalar loop
  // took a third of the forward).
  std::vector<double> gr(cc), gb(cc);
  channel_factors(f, gs, cc, mean, var, r, d, gr.data(), gb.data());
  // m and a per (ghost, channel); b per channel, the same for every ghost.
  const std::vector<A> gr_a = in_acc<A>(gr), b = in_acc<A>(gb);
  const auto m = scratch<A>(gs * cc), a = scratch<A>(gs * cc);
  for_each_ghost_row(g, [&](int64_t o) {
    ghost_coefficients<A>(cc, mean + o, var + o, gr_a.data(), f.eps, m.get() + o, a.get() + o);
  });
  for_all(
      g,
      [&](int64_t off, int64_t len, int64_t gh, int64_t ch) {
        const int64_t i = gh * cc + ch;
        write_run(stream, y + off, len, [&](T* out, int64_t at, int64_t count) {
          affine_run<T, A, Relu>(x + off + at, out, count, m[i], a[i], b[ch]);
        });
      },
      [&](int64_t row, int64_t gh) {
        const int64_t i = gh * cc, o = row * cc;
        write_run(stream, y + o, cc, [&](T* out, int64_t at, int64_t count) {
          affine_row<T, A, Relu>(x + o + at, out, count, m.get() + i + at, a.get() + i + at,
                                 b.data() + at);
        });
      });
}

// The elementwise pass y = act((x - m)·a + b) with per-channel m, a, b (one ghost).
template <typename T>
static at::Tensor affine_pass(const Geometry& g, const std::vector<double>& m,
                              const std::vector<double>& a, const std::vector<double>& b,
                              bool relu) {
  using A = typename Acc<T>::type;
  at::Tensor out = new_like(g.x);
  if (g.x.numel() == 0) return out;
  const T* x = g.x.const_data_ptr<T>();
  T* y = out.data_ptr<T>();
  const int64_t cc = g.c;
  std::vector<A> ma(m.begin(), m.end()), aa(a.begin(), a.end()), ba(b.begin(), b.end());
  const bool stream = streams(out);
  with_flag(relu, [&](auto relu_tag) {
    constexpr bool R = decltype(relu_tag)::value;
    for_all(
        g,
        [&](int64_t off, int64_t len, int64_t, int64_t ch) {
          write_run(stream, y + off, len, [&](T* dst, int64_t at, int64_t count) {
            affine_run<T, A, R>(x + off + at, dst, count, ma[ch], aa[ch], ba[ch]);
          });
        },
        [&](int64_t row, int64_t) {
          const int64_t o = row * cc;
          write_run(stream, y + o, cc, [&](T* dst, int64_t at, int64_t count) {
            affine_row<T, A, R>(x + o + at, dst, count, ma.data() + at, aa.data() + at,
                                ba.data() + at);
          });
        });
  });
  return out;
}

// f(std::true_type{}) or f(std::false_type{}): a runtime flag (the fused ReLU) as a
// template argument of the passes.
template <typename F>
static void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename F>
static void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kDouble:
      f(double{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "bnkit: unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& input, bool float64,
                                            const std::optional<at::Tensor>& sample_weight) {
  check_input(input);
  Geometry g = geometry_of(input);
  attach_weights(g, sample_weight);
  TORCH_CHECK(g.c == 0 || g.count() > 0, "bnkit::bn_stats: no values per channel (shape ",
              input.sizes(), ")");
  auto opts = input.options().dtype(at::kDouble);
  at::Tensor mean = at::empty({g.c}, opts);
  at::Tensor var = at::empty({g.c}, opts);
  if (g.c > 0) {
    dispatch_dtype(input.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      statistics<T>(g, g.x.const_data_ptr<T>(), mean.data_ptr<double>(), var.data_ptr<double>());
    });
  }
  if (float64) return {mean, var};
  const auto out = stats_dtype(input.scalar_type());
  return {mean.to(out), var.to(out)};
}

at::Tensor bn_normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                        const at::Tensor& shift, bool relu) {
  check_input(input);
  const Geometry g = geometry_of(input);
  check_vector(mean, g.c, "mean");
  check_vector(scale, g.c, "scale");
  check_vector(shift, g.c, "shift");
  at::Tensor y;
  dispatch_dtype(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    y = affine_pass<T>(g, values_of<double>(mean), values_of<double>(scale),
                       values_of<double>(shift), relu);
  });
  return y;
}

at::Tensor bn_eval(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   double eps, bool relu) {
  check_input(input);
  const Geometry g = geometry_of(input);
  check_vector(mean, g.c, "mean");
  check_vector(var, g.c, "var");
  if (has(weight)) check_vector(*weight, g.c, "weight");
  if (has(bias)) check_vector(*bias, g.c, "bias");
  // Fold in double: a = γ / sqrt(σ² + eps), b = β.
  const std::vector<double> vv = values_of<double>(var), w = values_of<double>(weight);
  std::vector<double> a(g.c), b = values_of<double>(bias);
  if (b.empty()) b.assign(g.c, 0.0);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    a[ch] = (w.empty() ? 1.0 : w[ch]) / std::sqrt(vv[ch] + eps);
  }
  at::Tensor y;
  dispatch_dtype(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    y = affine_pass<T>(g, values_of<double>(mean), a, b, relu);
  });
  return y;
}

// The running-statistics rules that bnkit's running.py lets the kernel apply (see
// running.kernel_rule and docs/architecture.md; running.py stays their reference, and the tests
// hold the two together):
//
// * PyTorch's, as torch.nn.functional.batch_norm applies it inside its kernel:
//   stat += momentum·(batch − stat), with the mean and the Bessel-corrected variance
//   (n/max(n − 1, 1), n values per channel per ghost), or the biased variance (TF-slim, Keras),
//   averaged over ghosts, in float64, stored in the buffer's dtype.
// * Keras' batch renormalization, when running_std is given: running_std absorbs
//   sqrt(var + eps) instead of running_var absorbing var, and running_var := max(std² − eps, 0);
//   renorm_mean and renorm_std absorb the mean and sqrt(biased var + eps) with renorm_momentum.
//
// With guard (the layer's nonfinite policy): when any value the update would store is NaN or
// infinite (a batch with a NaN or an inf, or buffers that already were), nothing is written and
// the result is false; the layer then counts and reports the skipped update. This is the same
// decision as the layer's snapshot-and-restore check, made before writing instead of after.
struct RunningRule {
  at::Tensor mean, var;            // running_mean, running_var
  at::Tensor std;                  // Keras renorm's running_std (undefined: PyTorch's rule)
  at::Tensor renorm_mean, renorm_std;
  double momentum = 0.0, renorm_momentum = 0.0;
  bool biased = false;             // feed the biased batch variance (TF) instead of Bessel's
};

// One buffer's next values, in the buffer's dtype S: value[ch] := old + w·(value[ch] − old),
// rounded to S (exact in double afterwards); true when every result is finite. Σ next·0 is 0
// when every value is finite and NaN otherwise (inf·0 and NaN·0 are NaN): a finiteness test
// without a branch per channel, so the loop vectorizes.
template <typename S>
static bool next_values_of(const S* p, double* v, int64_t n, double w) {
  double poison = 0.0;
#pragma omp simd reduction(+ : poison)
  for (int64_t ch = 0; ch < n; ++ch) {
    const double old = static_cast<double>(p[ch]);
    const double next = static_cast<double>(static_cast<S>(old + w * (v[ch] - old)));
    poison += next * 0.0;
    v[ch] = next;
  }
  return !std::isnan(poison);
}

static bool next_values(const at::Tensor& buffer, std::vector<double>& value, double w) {
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(buffer.scalar_type(), "bnkit_running", [&] {
    finite = next_values_of<scalar_t>(buffer.const_data_ptr<scalar_t>(), value.data(),
                                      static_cast<int64_t>(value.size()), w);
  });
  return finite;
}

static void store_values(const at::Tensor& buffer, const std::vector<double>& value) {
  AT_DISPATCH_FLOATING_TYPES(buffer.scalar_type(), "bnkit_running_store", [&] {
    scalar_t* p = buffer.data_ptr<scalar_t>();
    for (size_t ch = 0; ch < value.size(); ++ch) p[ch] = static_cast<scalar_t>(value[ch]);
  });
}

static bool update_running(const Geometry& g, const double* mean, const double* var,
                           const RunningRule& rule, double eps, bool guard) {
  // Bessel's factor n/max(n − 1, 1) of a ghost batch with n values (or total weight).
  auto bessel = [&](int64_t gh) {
    const double n = g.denominator(gh);
    return rule.biased ? 1.0 : n / std::max(n - 1.0, 1.0);
  };
  // Weighted ghost batches have different totals, hence their own factors.
  const bool per_ghost = g.weighted() && g.ghosts > 1;
  const double gs = static_cast<double>(g.ghosts);
  std::vector<double> mu(g.c, 0.0), vb(g.c, 0.0);  // ghost-averaged mean and biased variance
  std::vector<double> vin(g.c, 0.0);  // the variance the running estimate absorbs
  double* const pm = mu.data();  // plain pointers and no branch inside: the loops vectorize
  double* const pv = vb.data();
  double* const pin = vin.data();
  for (int64_t gh = 0; gh < g.ghosts; ++gh) {
    const double* const m = mean + gh * g.c;
    const double* const v = var + gh * g.c;
#pragma omp simd
    for (int64_t ch = 0; ch < g.c; ++ch) {
      pm[ch] += m[ch];
      pv[ch] += v[ch];
    }
    if (per_ghost) {
      const double factor = bessel(gh);
#pragma omp simd
      for (int64_t ch = 0; ch < g.c; ++ch) pin[ch] += v[ch] * factor;
    }
  }
  const double common = bessel(0) / gs;
  for (int64_t ch = 0; ch < g.c; ++ch) {
    mu[ch] /= gs;
    vin[ch] = per_ghost ? vin[ch] / gs : vb[ch] * common;
    vb[ch] /= gs;
  }
  const bool renorm = rule.std.defined();
  // New values in the buffers' dtypes first (a float32 buffer can overflow where the double
  // value did not), written only once every one is known to stay finite.
  std::vector<double> rmean, rstd;
  if (renorm) {
    rmean = mu;
    rstd.resize(g.c);
    for (int64_t ch = 0; ch < g.c; ++ch) rstd[ch] = std::sqrt(vb[ch] + eps);
    for (int64_t ch = 0; ch < g.c; ++ch) vin[ch] = std::sqrt(vin[ch] + eps);  // a stddev now
  }
  bool finite = next_values(rule.mean, mu, rule.momentum);
  finite &= next_values(renorm ? rule.std : rule.var, vin, rule.momentum);
  std::vector<double> vnext;
  if (renorm) {
    // running_var := max(std² − eps, 0) in the buffer's dtype, as running.py (and Keras)
    // compute it: when the variance is far below eps the subtraction cancels, and float64
    // arithmetic would give a different (more exact) value than the reference.
    vnext.resize(g.c);
    AT_DISPATCH_FLOATING_TYPES(rule.var.scalar_type(), "bnkit_running_var", [&] {
      const scalar_t e = static_cast<scalar_t>(eps);
      for (int64_t ch = 0; ch < g.c; ++ch) {
        const scalar_t s = static_cast<scalar_t>(vin[ch]);  // exact: the stored stddev
        volatile scalar_t square = s * s;  // rounded, not fused into the subtraction
        const scalar_t diff = square - e;
        const scalar_t v = diff < scalar_t(0) ? scalar_t(0) : diff;  // NaN stays NaN
        finite = finite && std::isfinite(static_cast<double>(v));
        vnext[ch] = static_cast<double>(v);
      }
    });
    finite &= next_values(rule.renorm_mean, rmean, rule.renorm_momentum);
    finite &= next_values(rule.renorm_std, rstd, rule.renorm_momentum);
  }
  if (guard && !finite) return false;
  store_values(rule.mean, mu);
  if (renorm) {
    store_values(rule.std, vin);
    store_values(rule.var, vnext);
    store_values(rule.renorm_mean, rmean);
    store_values(rule.renorm_std, rstd);
  } else {
    store_values(rule.var, vin);
  }
  return true;
}

static void check_running(const std::optional<at::Tensor>& t, int64_t c, const char* name) {
  if (!has(t)) return;
  check_vector(*t, c, name);
  TORCH_CHECK(t->is_contiguous() && t->device().is_cpu() &&
                  (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble),
              "bnkit: ", name, " must be a contiguous float32 or float64 CPU tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_train(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t ghosts, bool strided,
    const std::optional<at::Tensor>& renorm_mean, const std::optional<at::Tensor>& renorm_std,
    std::optional<double> rmin, std::optional<double> rmax, std::optional<double> dmax,
    bool relu, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum,
    const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& num_batches_tracked, bool guard,
    const std::optional<at::Tensor>& running_std, double renorm_momentum, bool biased) {
  check_input(input);
  Geometry g = geometry_of(input, ghosts, strided);
  attach_weights(g, sample_weight);
  TORCH_CHECK(g.c == 0 || g.count() > 0, "bnkit::bn_train: no values per channel (shape ",
              input.sizes(), ")");
  TORCH_CHECK(has(renorm_mean) == has(renorm_std),
              "bnkit::bn_train: renorm needs both renorm_mean and renorm_std");
  Affine f;
  f.eps = eps;
  if (has(weight)) check_vector(*weight, g.c, "weight");
  if (has(bias)) check_vector(*bias, g.c, "bias");
  f.weight = values_of<double>(weight);
  f.bias = values_of<double>(bias);
  if (has(renorm_std)) {
    check_vector(*renorm_mean, g.c, "renorm_mean");
    check_vector(*renorm_std, g.c, "renorm_std");
    f.renorm_mean = values_of<double>(renorm_mean);
    f.renorm_std = values_of<double>(renorm_std);
    f.rmin = rmin;
    f.rmax = rmax;
    f.dmax = dmax;
  }
  TORCH_CHECK(has(running_mean) == has(running_var),
              "bnkit::bn_train: give both running_mean and running_var, or neither");
  check_running(running_mean, g.c, "running_mean");
  check_running(running_var, g.c, "running_var");
  if (has(running_std)) {
    TORCH_CHECK(has(running_mean) && has(renorm_std),
                "bnkit::bn_train: running_std (Keras' renorm rule) needs running_mean, "
                "running_var, renorm_mean and renorm_std too");
    check_running(running_std, g.c, "running_std");
    check_running(renorm_mean, g.c, "renorm_mean");
    check_running(renorm_std, g.c, "renorm_std");
  }
  if (has(num_batches_tracked)) {
    TORCH_CHECK(has(running_mean), "bnkit::bn_train: num_batches_tracked counts updates of ",
                "running_mean/running_var; give them too");
    TORCH_CHECK(num_batches_tracked->numel() == 1 && num_batches_tracked->device().is_cpu() &&
                    num_batches_tracked->scalar_type() == at::kLong,
                "bnkit::bn_train: num_batches_tracked must be a one-element int64 CPU tensor");
  }
  const int64_t width = g.ghosts * g.c, rd = f.renorm() ? g.c : 0;
  // The statistics write every (ghost, channel): no zeroing (with many ghosts of a 2-D input
  // it took 8% of the call).
  const auto mean = scratch<double>(width), var = scratch<double>(width);
  std::vector<double> r(rd), d(rd);
  at::Tensor y = new_like(g.x);
  if (g.c > 0 && g.x.numel() > 0) {
    dispatch_dtype(input.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      double* rp = f.renorm() ? r.data() : nullptr;
      double* dp = f.renorm() ? d.data() : nullptr;
      const bool stream = streams(y);
      if (relu) {
        train_forward<T, true>(g, f, y.data_ptr<T>(), stream, mean.get(), var.get(), rp, dp);
      } else {
        train_forward<T, false>(g, f, y.data_ptr<T>(), stream, mean.get(), var.get(), rp, dp);
      }
    });
  }  // else C = 0 (input without values is rejected above): no statistics to write
  bool applied = true;
  if (has(running_mean) && g.c > 0 && g.x.numel() > 0) {
    RunningRule rule;
    rule.mean = *running_mean;
    rule.var = *running_var;
    rule.momentum = momentum;
    rule.biased = biased;
    if (has(running_std)) {
      rule.std = *running_std;
      rule.renorm_mean = *renorm_mean;
      rule.renorm_std = *renorm_std;
      rule.renorm_momentum = renorm_momentum;
    }
    applied = update_running(g, mean.get(), var.get(), rule, eps, guard);
  }
  // As torch.nn.BatchNorm*d counts its training calls; an update the guard skipped is not one.
  if (applied && has(num_batches_tracked)) ++num_batches_tracked->data_ptr<int64_t>()[0];
  const auto out = stats_dtype(input.scalar_type());
  std::vector<int64_t> stat_shape = {g.c};
  if (g.ghosts != 1) stat_shape = {g.ghosts, g.c};
  return {y,
          tensor_of(mean.get(), static_cast<size_t>(width), stat_shape, out),
          tensor_of(var.get(), static_cast<size_t>(width), stat_shape, out),
          tensor_of(r, {rd}, out),
          tensor_of(d, {rd}, out),
          at::scalar_tensor(applied, at::TensorOptions().dtype(at::kBool))};
}

// ------------------------------------------------------------------------------ backward

struct GradTerms {
  std::vector<double> mean, invstd;        // ghosts * C
  std::vector<double> weight, r, d;        // C (empty: 1, 1, 0)
  std::vector<double> grad_mean, grad_var;  // ghosts * C (empty: none)
};

// Per (ghost, channel) from the sums: gx = a·dy' + b·(x - m) + e with k = γ·r·invstd,
// a = k, b = -k·invstd²·S2/n + 2·gv/n, e = -k·S1/n + gm/n.
template <typename A>
static void grad_coefficients(const GradTerms& t, int64_t i, int64_t ch, double count, double s1,
                              double s2, A& m, A& a, A& b, A& e) {
  const double is = t.invstd[i], inv = 1.0 / count;
  const double k = (t.weight.empty() ? 1.0 : t.weight[ch]) * (t.r.empty() ? 1.0 : t.r[ch]) * is;
  double bb = -k * is * is * s2 * inv;
  double ee = -k * s1 * inv;
  if (!t.grad_mean.empty()) ee += t.grad_mean[i] * inv;
  if (!t.grad_var.empty()) bb += 2.0 * t.grad_var[i] * inv;
  m = static_cast<A>(t.mean[i]);
  a = static_cast<A>(k);
  b = static_cast<A>(bb);
  e = static_cast<A>(ee);
}

// γ·r per channel (1 where absent): the part of grad_coefficients()' k shared by every ghost.
static std::vector<double> grad_gains(const GradTerms& t, int64_t cc) {
  std::vector<double> gamma_r(cc);
  for (int64_t ch = 0; ch < cc; ++ch) {
    gamma_r[ch] = (t.weight.empty() ? 1.0 : t.weight[ch]) * (t.r.empty() ? 1.0 : t.r[ch]);
  }
  return gamma_r;
}

// grad_coefficients() for the C channels of the ghost whose (ghost, channel) values start at
// o, with γ·r hoisted (gamma_r) and the ghost's means mu and sums s1, s2: contiguous, so the
// loop vectorizes.
template <typename A>
static inline void ghost_grad_coefficients(const GradTerms& t, int64_t o, int64_t cc,
                                           const double* gamma_r, const A* mu,
                                           const double* s1, const double* s2, double count,
                                           A* m, A* a, A* b, A* e) {
  const double* is = t.invstd.data() + o;
  const double* gm = t.grad_mean.empty() ? nullptr : t.grad_mean.data() + o;
  const double* gv = t.grad_var.empty() ? nullptr : t.grad_var.data() + o;
  const double inv = 1.0 / count;
#pragma omp simd
  for (int64_t ch = 0; ch < cc; ++ch) {
    const double k = gamma_r[ch] * is[ch];
    double bb = -k * is[ch] * is[ch] * s2[ch] * inv;
    double ee = -k * s1[ch] * inv;
    if (gm != nullptr) ee += gm[ch] * inv;
    if (gv != nullptr) bb += 2.0 * gv[ch] * inv;
    m[ch] = mu[ch];
    a[ch] = static_cast<A>(k);
    b[ch] = static_cast<A>(bb);
    e[ch] = static_cast<A>(ee);
  }
}

// Backward of ghost_local() geometries: per ghost, its sums (into s1, s2), coefficients and
// dx while its rows are cached; the same sums and coefficients as the two-pass route.
template <typename T, bool Relu>
static void ghost_local_backward(const Geometry& g, const GradTerms& t, const T* dy, const T* y,
                                 T* gx, bool stream, double* s1, double* s2) {
  using A = typename Acc<T>::type;
  const T* x = g.x.const_data_ptr<T>();
  const int64_t cc = g.c, rows = g.per_ghost() * g.inner;
  const std::vector<double> gamma_r = grad_gains(t, cc);
  parallel(g, 0, g.ghosts, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> mu(cc), q1(cc), q2(cc), m(cc), a(cc), b(cc), e(cc);
    for (int64_t gh = begin; gh < end; ++gh) {
      const int64_t o = gh * cc, r0 = gh * rows, r1 = r0 + rows;
      for (int64_t ch = 0; ch < cc; ++ch) mu[ch] = static_cast<A>(t.mean[o + ch]);
      local_ghost_sums<A>(g, gh, q1.data(), q2.data(), s1 + o, s2 + o,
                          [&](A* p1, A* p2, int64_t lo, int64_t hi, int64_t) {
                            grad_row_sums<T, A, Relu>(x, dy, y, cc, lo, hi, mu.data(), p1, p2);
                          });
      ghost_grad_coefficients<A>(t, o, cc, gamma_r.data(), mu.data(), s1 + o, s2 + o,
                                 g.denominator(gh), m.data(), a.data(), b.data(), e.data());
      std::optional<RowWeights<A>> weights;
      if (g.weighted()) weights.emplace(g, r0);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t o_row = row * cc;
        // Weighted: the correction terms are scaled by the row's weight (the sums are not).
        const A wr = weights ? weights->next() : A(1);
        write_run(stream, gx + o_row, cc, [&](T* out, int64_t at, int64_t count) {
          const int64_t p = o_row + at;
          if (weights) {
            weighted_grad_row<T, A, Relu>(x + p, dy + p, y + p, out, count, m.data() + at,
                                          a.data() + at, b.data() + at, e.data() + at, wr);
          } else {
            grad_row<T, A, Relu>(x + p, dy + p, y + p, out, count, m.data() + at,
                                 a.data() + at, b.data() + at, e.data() + at);
          }
        });
      }
    }
    stream_fence();
  });
}

// Σdy' and Σdy'·(x - mu) per (ghost, channel) into s1, s2 (ghosts * C doubles each) in one
// pass over memory, mu the (ghosts * C) means in the accumulation type.
template <typename T, bool Relu>
static void all_grad_sums(const Geometry& g, const typename Acc<T>::type* mu, const T* dy,
                          const T* y, double* s1, double* s2) {
  using A = typename Acc<T>::type;
  const T* x = g.x.const_data_ptr<T>();
  const int64_t cc = g.c;
  if (g.rows) {
    row_sums<A>(g, s1, s2, [&](A* q1, A* q2, int64_t begin, int64_t end, int64_t gh) {
      grad_row_sums<T, A, Relu>(x, dy, y, cc, begin, end, mu + gh * cc, q1, q2);
    });
  } else {
    block_sums<A>(g, s1, s2,
                  [&](A& a1, A& a2, int64_t off, int64_t len, int64_t gh, int64_t ch) {
                    grad_sums<T, A, Relu>(x + off, dy + off, y + off, len, mu[gh * cc + ch], a1,
                                          a2);
                  });
  }
}

// The input gradient's pass, gx = a·dy' + w·(b·(x - m) + e) with the (ghosts * C)
// coefficients of grad_coefficients() and each value's sample weight w (1 without weights).
template <typename T, bool Relu, typename A>
static void grad_input_pass(const Geometry& g, const T* dy, const T* y, T* gx, bool stream,
                            const A* m, const A* a, const A* b, const A* e) {
  const T* x = g.x.const_data_ptr<T>();
  const int64_t cc = g.c;
  if (g.weighted()) {
    // dx = γ·invstd·(dy' - w·(Σdy'/W + x̂·Σdy'·x̂/W)): the mean and variance move with
    // each value's weight, so the correction terms are scaled by it (the sums are not).
    const int64_t plane = cc * g.inner;
    for_all(
        g,
        [&](int64_t off, int64_t len, int64_t gh, int64_t ch) {
          const int64_t smp = off / plane, pos = off % g.inner, i = gh * cc + ch;
          const A* wp = g.weights_at<A>(smp, pos);
          write_run(stream, gx + off, len, [&](T* out, int64_t k, int64_t count) {
            const int64_t o = off + k;
            if (g.per_sample) {
              grad_run<T, A, Relu>(x + o, dy + o, y + o, out, count, m[i], a[i], *wp * b[i],
                                   *wp * e[i]);
            } else {
              masked_grad_run<T, A, Relu>(x + o, dy + o, y + o, wp + k, out, count, m[i], a[i],
                                          b[i], e[i]);
            }
          });
        },
        [&](int64_t row, int64_t gh, int64_t smp) {
          const int64_t o = row * cc, i = gh * cc;
          const A wr = *g.weights_at<A>(smp, row - smp * g.inner);
          write_run(stream, gx + o, cc, [&](T* out, int64_t k, int64_t count) {
            const int64_t p = o + k, q = i + k;
            weighted_grad_row<T, A, Relu>(x + p, dy + p, y + p, out, count, m + q, a + q, b + q,
                                          e + q, wr);
          });
        });
    return;
  }
  for_all(
      g,
      [&](int64_t off, int64_t len, int64_t gh, int64_t ch) {
        const int64_t i = gh * cc + ch;
        write_run(stream, gx + off, len, [&](T* out, int64_t at, int64_t count) {
          const int64_t o = off + at;
          grad_run<T, A, Relu>(x + o, dy + o, y + o, out, count, m[i], a[i], b[i], e[i]);
        });
      },
      [&](int64_t row, int64_t gh) {
        const int64_t i = gh * cc, o = row * cc;
        write_run(stream, gx + o, cc, [&](T* out, int64_t at, int64_t count) {
          const int64_t p = o + at, q = i + at;
          grad_row<T, A, Relu>(x + p, dy + p, y + p, out, count, m + q, a + q, b + q, e + q);
        });
      });
}

template <typename T, bool Relu>
static void train_backward(const Geometry& g, const GradTerms& t, const T* dy, const T* y, T* gx,
                           double* s1, double* s2) {
  using A = typename Acc<T>::type;
  const T* x = g.x.const_data_ptr<T>();
  const int64_t cc = g.c, gs = g.ghosts;
  const bool stream = streams_bytes(g.x.nbytes());  // dx has x's size
  if (const int64_t k = tile_channels(g, Relu ? 3 : 2, large_long_planes(g)); k > 0) {
    for_each_tile(g, k, [&](int64_t c0, int64_t c1) {
      const int64_t w = (c1 - c0) * gs;
      std::vector<A> mu(w), m(w), a(w), b(w), e(w);
      std::vector<double> u1(w, 0.0), u2(w, 0.0);
      for (int64_t ch = c0; ch < c1; ++ch) {
        for (int64_t gh = 0; gh < gs; ++gh) {
          mu[(ch - c0) * gs + gh] = static_cast<A>(t.mean[gh * cc + ch]);
        }
      }
      const int64_t len = (c1 - c0) * g.inner, plane = cc * g.inner;
      if (short_runs(g)) {
        const std::vector<A> ms = spread(g, mu, c1 - c0);
        tile_run_sums<A>(g, c0, c1, u1, u2, [&](int64_t off, A* q1, A* q2, int64_t gh) {
          const A* mg = ms.data() + gh * len;
          grad_row_sums<T, A, Relu>(x + off, dy + off, y + off, len, 0, 1, mg, q1, q2);
        });
      } else {
        for_each_tile_run(g, c0, c1, [&](int64_t off, int64_t n, int64_t gh, int64_t ch) {
          const int64_t i = (ch - c0) * gs + gh;
          A a1 = 0, a2 = 0;
          grad_sums<T, A, Relu>(x + off, dy + off, y + off, n, mu[i], a1, a2);
          u1[i] += a1;
          u2[i] += a2;
        });
      }
      for (int64_t ch = c0; ch < c1; ++ch) {
        for (int64_t gh = 0; gh < gs; ++gh) {
          const int64_t i = (ch - c0) * gs + gh, j = gh * cc + ch;
          s1[j] = u1[i];
          s2[j] = u2[i];
          grad_coefficients<A>(t, j, ch, g.denominator(gh), u1[i], u2[i], m[i], a[i], b[i],
                               e[i]);
        }
      }
      if (short_runs(g)) {
        const int64_t kt = c1 - c0;
        const std::vector<A> ms = spread(g, m, kt), as = spread(g, a, kt), bs = spread(g, b, kt),
                             es = spread(g, e, kt);
        for_each_sample_run(g, c0, [&](int64_t off, int64_t gh) {
          const int64_t at = gh * len;
          write_run(stream, gx + off, len, [&](T* out, int64_t k, int64_t count) {
            const int64_t o = off + k, q = at + k;
            if (g.weighted()) {
              weighted_grad_row<T, A, Relu>(x + o, dy + o, y + o, out, count, ms.data() + q,
                                            as.data() + q, bs.data() + q, es.data() + q,
                                            *g.weights_at<A>(off / plane, 0));
            } else {
              grad_row<T, A, Relu>(x + o, dy + o, y + o, out, count, ms.data() + q,
                                   as.data() + q, bs.data() + q, es.data() + q);
            }
          });
        });
        stream_fence();
        return;
      }
      for_each_tile_run(g, c0, c1, [&](int64_t off, int64_t n, int64_t gh, int64_t ch) {
        const int64_t i = (ch - c0) * gs + gh;
        // Weighted: dx = γ·invstd·(dy' − w·(Σdy'/W + x̂·Σdy'·x̂/W)), the sums unweighted.
        const A ws = g.weighted() ? *g.weights_at<A>(off / plane, 0) : A(1);
        write_run(stream, gx + off, n, [&](T* out, int64_t k, int64_t count) {
          const int64_t o = off + k;
          grad_run<T, A, Relu>(x + o, dy + o, y + o, out, count, m[i], a[i], ws * b[i],
                               ws * e[i]);
        });
      });
      stream_fence();
    });
    return;
  }
  if (ghost_local(g, 2)) {
    ghost_local_backward<T, Relu>(g, t, dy, y, gx, stream, s1, s2);
    return;
  }
  const int64_t width = gs * cc;
  const auto mu = scratch<A>(width);
  for (int64_t i = 0; i < width; ++i) mu[i] = static_cast<A>(t.mean[i]);
  all_grad_sums<T, Relu>(g, mu.get(), dy, y, s1, s2);
  // grad_coefficients() for every (ghost, channel), one ghost's C values at a time.
  const std::vector<double> gamma_r = grad_gains(t, cc);
  const auto m = scratch<A>(width), a = scratch<A>(width), b = scratch<A>(width),
             e = scratch<A>(width);
  for_each_ghost_row(g, [&](int64_t o) {
    ghost_grad_coefficients<A>(t, o, cc, gamma_r.data(), mu.get() + o, s1 + o, s2 + o,
                               g.denominator(o / cc), m.get() + o, a.get() + o, b.get() + o,
                               e.get() + o);
  });
  grad_input_pass<T, Relu>(g, dy, y, gx, stream, m.get(), a.get(), b.get(), e.get());
}

// A tensor that goes with the input x of operator op (grad_out, output): same shape, CPU.
static void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* op,
                             const char* name) {
  TORCH_CHECK(t.sizes() == input.sizes(), "bnkit::", op, ": ", name, " shape ", t.sizes(),
              " differs from x shape ", input.sizes());
  TORCH_CHECK(t.device().is_cpu(), "bnkit: CPU tensors only");
}

// t in the memory layout of the geometry's x (equal strides), copying only when needed.
static at::Tensor like_geometry(const at::Tensor& t, const Geometry& g) {
  if (t.strides() == g.x.strides()) return t;
  if (g.rows && !g.x.is_contiguous()) {
    at::Tensor moved = t.movedim(1, -1).contiguous().movedim(-1, 1);
    TORCH_CHECK(moved.strides() == g.x.strides(), "bnkit: unexpected gradient strides");
    return moved;
  }
  return t.contiguous();
}

// What a backward pass reads besides x: grad_out, and a fused ReLU's output (grad_out again
// without one, never read then), in x's dtype and in the geometry's layout.
struct Upstream {
  at::Tensor dy, y;
};

static Upstream upstream_of(const Geometry& g, const at::Tensor& grad_out,
                            const std::optional<at::Tensor>& output) {
  const auto dtype = g.x.scalar_type();
  at::Tensor dy = like_geometry(grad_out.to(dtype), g);
  at::Tensor y = has(output) ? like_geometry(output->to(dtype), g) : dy;
  return {dy, y};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_mean, const std::optional<at::Tensor>& grad_var,
    int64_t ghosts, bool strided, const std::optional<at::Tensor>& r,
    const std::optional<at::Tensor>& d, const std::optional<at::Tensor>& output,
    const std::optional<at::Tensor>& sample_weight) {
  check_input(input);
  check_like_input(grad_out, input, "bn_backward", "grad_out");
  Geometry g = geometry_of(input, ghosts, strided);
  attach_weights(g, sample_weight);
  TORCH_CHECK(g.c == 0 || g.count() > 0, "bnkit::bn_backward: no values per channel (shape ",
              input.sizes(), ")");
  const int64_t width = g.ghosts * g.c;
  check_vector(mean, width, "mean");
  check_vector(invstd, width, "invstd");
  if (has(weight)) check_vector(*weight, g.c, "weight");
  if (has(grad_mean)) check_vector(*grad_mean, width, "grad_mean");
  if (has(grad_var)) check_vector(*grad_var, width, "grad_var");
  TORCH_CHECK(has(r) == has(d), "bnkit::bn_backward: renorm needs both r and d");
  if (has(r)) {
    check_vector(*r, g.c, "r");
    check_vector(*d, g.c, "d");
  }
  if (has(output)) check_like_input(*output, input, "bn_backward", "output");
  GradTerms t;
  t.mean = values_of<double>(mean);
  t.invstd = values_of<double>(invstd);
  t.weight = values_of<double>(weight);
  t.r = values_of<double>(r);
  t.d = values_of<double>(d);
  t.grad_mean = values_of<double>(grad_mean);
  t.grad_var = values_of<double>(grad_var);
  const auto dtype = input.scalar_type();
  const Upstream up = upstream_of(g, grad_out, output);
  // Every (ghost, channel) sum is written by train_backward: no zeroing (with many ghosts these
  // are as large as a 2-D input). An input without values has no channels here (checked above).
  const auto s1 = scratch<double>(width), s2 = scratch<double>(width);
  at::Tensor gx = new_like(g.x);
  if (g.x.numel() > 0) {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      with_flag(has(output), [&](auto relu) {
        train_backward<T, decltype(relu)::value>(g, t, up.dy.const_data_ptr<T>(),
                                                 up.y.const_data_ptr<T>(), gx.data_ptr<T>(),
                                                 s1.get(), s2.get());
      });
    });
  }
  // dβ = Σ_g S1; dγ = Σ_g (r·invstd·S2 + d·S1), the gradient of γ·(x̂·r + d); one ghost's
  // C channels at a time, so the loop vectorizes.
  std::vector<double> gb(g.c, 0.0), gw(g.c, 0.0);
  const std::vector<double> rs = t.r.empty() ? std::vector<double>(g.c, 1.0) : t.r;
  const std::vector<double> ds = t.d.empty() ? std::vector<double>(g.c, 0.0) : t.d;
  double* const pb = gb.data();
  double* const pw = gw.data();
  for (int64_t gh = 0; gh < g.ghosts; ++gh) {
    const int64_t o = gh * g.c;
    const double* const is = t.invstd.data() + o;
    const double* const u1 = s1.get() + o;
    const double* const u2 = s2.get() + o;
#pragma omp simd
    for (int64_t ch = 0; ch < g.c; ++ch) {
      pb[ch] += u1[ch];
      pw[ch] += rs[ch] * is[ch] * u2[ch] + ds[ch] * u1[ch];
    }
  }
  const auto out = stats_dtype(dtype);
  return {gx, tensor_of(gw, {g.c}, out), tensor_of(gb, {g.c}, out)};
}

// The backward in two halves, for statistics over several processes (synchronized layers):
// each process's sums first, then the input gradient from terms that the caller all-reduced
// in between. One pass over memory each; the fused backward's channel tiles need the sums
// within the tile, so they cannot serve here.

// Σdy' and Σdy'·(x − mean) per channel as a (2, C) float64 tensor; dy' = dy, or dy masked by
// output > 0 for the fused ReLU.
at::Tensor bn_grad_sums(const at::Tensor& grad_out, const at::Tensor& input,
                        const at::Tensor& mean, const std::optional<at::Tensor>& output) {
  check_input(input);
  check_like_input(grad_out, input, "bn_grad_sums", "grad_out");
  if (has(output)) check_like_input(*output, input, "bn_grad_sums", "output");
  const Geometry g = geometry_of(input);
  check_vector(mean, g.c, "mean");
  const auto dtype = input.scalar_type();
  const Upstream up = upstream_of(g, grad_out, output);
  at::Tensor sums = at::zeros({2, g.c}, input.options().dtype(at::kDouble));
  if (g.x.numel() == 0) return sums;
  double* const s = sums.data_ptr<double>();
  const std::vector<double> mv = values_of<double>(mean);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const std::vector<typename Acc<T>::type> mu(mv.begin(), mv.end());
    with_flag(has(output), [&](auto relu) {
      all_grad_sums<T, decltype(relu)::value>(g, mu.data(), up.dy.const_data_ptr<T>(),
                                              up.y.const_data_ptr<T>(), s, s + g.c);
    });
  });
  return sums;
}

// dx = γ·invstd·dy' + w·(grad_mean + 2·grad_var·(x − mean))/count per channel: the gradient
// of x̂ = (x − μ)·invstd through y plus the statistics' own, where grad_mean and grad_var are
// ∂L/∂μ and ∂L/∂σ² summed over the processes (−Σ γ·invstd·Σdy' and −½·Σ γ·invstd³·Σdy'·(x − μ)
// from the bn_grad_sums of each), count the values per channel over all of them (their total
// weight with sample weights) and w each value's sample weight (1 without). With renorm,
// weight is γ·r.
at::Tensor bn_grad_apply(const at::Tensor& grad_out, const at::Tensor& input,
                         const at::Tensor& mean, const at::Tensor& invstd,
                         const std::optional<at::Tensor>& weight, const at::Tensor& grad_mean,
                         const at::Tensor& grad_var, double count,
                         const std::optional<at::Tensor>& output,
                         const std::optional<at::Tensor>& sample_weight) {
  check_input(input);
  check_like_input(grad_out, input, "bn_grad_apply", "grad_out");
  if (has(output)) check_like_input(*output, input, "bn_grad_apply", "output");
  TORCH_CHECK(count > 0, "bnkit::bn_grad_apply: count must be positive, got ", count);
  Geometry g = geometry_of(input);
  // This process's weights may sum to zero: count is the total over all of them.
  attach_weights(g, sample_weight, /*require_positive=*/false);
  check_vector(mean, g.c, "mean");
  check_vector(invstd, g.c, "invstd");
  if (has(weight)) check_vector(*weight, g.c, "weight");
  check_vector(grad_mean, g.c, "grad_mean");
  check_vector(grad_var, g.c, "grad_var");
  GradTerms t;
  t.mean = values_of<double>(mean);
  t.invstd = values_of<double>(invstd);
  t.weight = values_of<double>(weight);
  t.grad_mean = values_of<double>(grad_mean);
  t.grad_var = values_of<double>(grad_var);
  const auto dtype = input.scalar_type();
  const Upstream up = upstream_of(g, grad_out, output);
  at::Tensor gx = new_like(g.x);
  if (g.x.numel() == 0) return gx;
  const std::vector<double> zeros(g.c, 0.0), gamma_r = grad_gains(t, g.c);
  const bool stream = streams_bytes(g.x.nbytes());
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    std::vector<A> mu(t.mean.begin(), t.mean.end()), m(g.c), a(g.c), b(g.c), e(g.c);
    // Zero sums: the all-reduced grad_mean and grad_var carry every process's.
    ghost_grad_coefficients<A>(t, 0, g.c, gamma_r.data(), mu.data(), zeros.data(), zeros.data(),
                               count, m.data(), a.data(), b.data(), e.data());
    with_flag(has(output), [&](auto relu) {
      grad_input_pass<T, decltype(relu)::value>(
          g, up.dy.const_data_ptr<T>(), up.y.const_data_ptr<T>(),
          gx.data_ptr<T>(), stream, m.data(), a.data(), b.data(), e.data());
    });
  });
  return gx;
}

// ------------------------------------------------------------------------------ eval backward

// dx = k·dy' with k = γ/sqrt(var + eps) per channel (dy' = dy masked by y > 0 with the ReLU).
template <typename T, typename A, bool Relu>
static inline void scale_run(const T* dy, const T* y, T* gx, int64_t len, A k) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    A gi = widen<A>(dy[i]);
    if constexpr (Relu) gi = widen<A>(y[i]) > A(0) ? gi : A(0);
    gx[i] = narrow<T>(k * gi);
  }
}

template <typename T, typename A, bool Relu>
static inline void scale_row(const T* dy, const T* y, T* gx, int64_t cc, const A* k) {
#pragma omp simd
  for (int64_t ch = 0; ch < cc; ++ch) {
    A gi = widen<A>(dy[ch]);
    if constexpr (Relu) gi = widen<A>(y[ch]) > A(0) ? gi : A(0);
    gx[ch] = narrow<T>(k[ch] * gi);
  }
}

// The inference pass's gradient: dx in one pass (dy in, dx out, as a copy), and, when s1 is
// given, Σdy' and Σdy'·(x − μ) per channel in a pass before it (for dβ and dγ).
template <typename T, bool Relu>
static void eval_backward(const Geometry& g, const std::vector<double>& mean,
                          const std::vector<double>& k, const T* dy, const T* y, T* gx, double* s1,
                          double* s2) {
  using A = typename Acc<T>::type;
  const T* x = g.x.const_data_ptr<T>();
  const int64_t cc = g.c;
  const std::vector<A> mu(mean.begin(), mean.end()), ka(k.begin(), k.end());
  if (s1 != nullptr) {
    if (g.rows) {
      row_sums<A>(g, s1, s2, [&](A* q1, A* q2, int64_t begin, int64_t end, int64_t) {
        grad_row_sums<T, A, Relu>(x, dy, y, cc, begin, end, mu.data(), q1, q2);
      });
    } else {
      block_sums<A>(g, s1, s2, [&](A& a1, A& a2, int64_t off, int64_t len, int64_t, int64_t ch) {
        grad_sums<T, A, Relu>(x + off, dy + off, y + off, len, mu[ch], a1, a2);
      });
    }
  }
  const bool stream = streams_bytes(g.x.nbytes());  // dx has x's size
  for_all(
      g,
      [&](int64_t off, int64_t len, int64_t, int64_t ch) {
        write_run(stream, gx + off, len, [&](T* out, int64_t k, int64_t count) {
          scale_run<T, A, Relu>(dy + off + k, y + off + k, out, count, ka[ch]);
        });
      },
      [&](int64_t row, int64_t) {
        const int64_t o = row * cc;
        write_run(stream, gx + o, cc, [&](T* out, int64_t k, int64_t count) {
          scale_row<T, A, Relu>(dy + o + k, y + o + k, out, count, ka.data() + k);
        });
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_eval_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight, double eps,
    const std::optional<at::Tensor>& output, bool param_grads) {
  check_input(input);
  check_like_input(grad_out, input, "bn_eval_backward", "grad_out");
  const Geometry g = geometry_of(input);
  check_vector(mean, g.c, "mean");
  check_vector(var, g.c, "var");
  if (has(weight)) check_vector(*weight, g.c, "weight");
  if (has(output)) check_like_input(*output, input, "bn_eval_backward", "output");
  const std::vector<double> mv = values_of<double>(mean), vv = values_of<double>(var),
                            w = values_of<double>(weight);
  std::vector<double> invstd(g.c), k(g.c);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    invstd[ch] = 1.0 / std::sqrt(vv[ch] + eps);
    k[ch] = (w.empty() ? 1.0 : w[ch]) * invstd[ch];
  }
  const auto dtype = input.scalar_type();
  const Upstream up = upstream_of(g, grad_out, output);
  std::vector<double> s1(param_grads ? g.c : 0, 0.0), s2(param_grads ? g.c : 0, 0.0);
  at::Tensor gx = new_like(g.x);
  if (g.x.numel() > 0) {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      double* p1 = param_grads ? s1.data() : nullptr;
      double* p2 = param_grads ? s2.data() : nullptr;
      with_flag(has(output), [&](auto relu) {
        eval_backward<T, decltype(relu)::value>(g, mv, k, up.dy.const_data_ptr<T>(),
                                                up.y.const_data_ptr<T>(),
                                                gx.data_ptr<T>(), p1, p2);
      });
    });
  }
  // dβ = Σdy', dγ = Σdy'·(x − μ)·invstd (zeros when not asked for).
  std::vector<double> gw(g.c, 0.0), gb(g.c, 0.0);
  if (param_grads && g.x.numel() > 0) {
    for (int64_t ch = 0; ch < g.c; ++ch) {
      gb[ch] = s1[ch];
      gw[ch] = s2[ch] * invstd[ch];
    }
  }
  const auto out = stats_dtype(dtype);
  return {gx, tensor_of(gw, {g.c}, out), tensor_of(gb, {g.c}, out)};
}

// ------------------------------------------------------------------------------ autograd

// Whether t is a real CPU tensor read outside any tracing (no fake or functional tensor, no
// dispatch mode), so that its data may be read directly.
static bool plain_cpu_tensor(const at::Tensor& t) {
  const auto traced = c10::DispatchKeySet({c10::DispatchKey::Python,
                                           c10::DispatchKey::Functionalize,
                                           c10::DispatchKey::PythonTLSSnapshot});
  return t.device().is_cpu() && !t.key_set().has_any(traced) &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set();
}

// q[i] = 1/sqrt(p[i] + e), vectorized (a scalar loop cost 10 µs per backward with 16 ghosts of
// 1024 channels; omp simd cannot stand inside AT_DISPATCH's lambda).
template <typename S>
static void inverse_std_values(const S* p, S* q, int64_t n, S e) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) q[i] = S(1) / std::sqrt(p[i] + e);
}

// at::rsqrt(var + eps) as a plain loop: ATen's add and rsqrt on these C values took about 25 µs
// per backward, right after a large kernel has evicted the dispatcher's working set from the
// caches. The same arithmetic in var's dtype (eps rounded to it, a correctly rounded add,
// square root and division, as ATen's CPU kernels compute them), so the eager gradient equals
// the one of a traced graph, which keeps the ATen operations (torch.compile's backward).
static at::Tensor inverse_std(const at::Tensor& var, double eps) {
  if (!plain_cpu_tensor(var)) return at::rsqrt(var + eps);
  const at::Tensor v = var.contiguous();
  at::Tensor out = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bnkit_inverse_std", [&] {
    inverse_std_values(v.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), v.numel(),
                       static_cast<scalar_t>(eps));
  });
  return out;
}

// The dispatcher's handle of a bnkit operator, typed as its C++ kernel `Fn`.
template <typename Fn>
static c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// bn_train's arguments: its backward returns one gradient slot for each.
constexpr size_t kTrainArguments = 21;

static torch::autograd::variable_list differentiable_backward(
    torch::autograd::AutogradContext* ctx, const torch::autograd::variable_list& grads,
    const torch::autograd::variable_list& saved);

// The autograd formula of bn_train, in C++ so a training step pays no Python on the way in
// or out. y depends on x, γ, β (r and d are constants); mean and var are differentiable
// outputs too (their gradients fold into bn_backward's coefficients); r and d are not.
// Calling below ADInplaceOrView (as the autograd kernels do) also skips its version-counter
// bump of the buffers that bn_train updates in place; this does it, so that autograd still sees
// that a saved buffer was modified.
static void bump_buffer_versions(const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var,
                                 const std::optional<at::Tensor>& num_batches_tracked,
                                 const std::optional<at::Tensor>& running_std,
                                 const std::optional<at::Tensor>& renorm_mean,
                                 const std::optional<at::Tensor>& renorm_std) {
  auto bump = [](const std::optional<at::Tensor>& t) {
    if (has(t) && !t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
  };
  for (const auto* t : {&running_mean, &running_var, &num_batches_tracked, &running_std}) {
    bump(*t);
  }
  if (has(running_std)) {  // Keras' renorm rule also moves the renorm statistics
    bump(renorm_mean);
    bump(renorm_std);
  }
}

// Whether an autograd kernel may skip its torch::autograd::Function: no gradient can flow
// (grad mode off, or no differentiable input requires one) and no input carries a forward-mode
// tangent (the Function would raise for it, as C++ Functions have no jvp). The Function's node,
// saved variables and output wrapping cost several microseconds per call, most of a small
// layer's time in inference and under torch.no_grad().
static bool needs_autograd(std::initializer_list<const at::Tensor*> inputs) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const at::Tensor* t : inputs) {
    if (!t->defined()) continue;
    if (grad_mode && t->requires_grad()) return true;
    if (t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// bn_train's CPU kernel called below autograd (from TrainFunction, or directly when no
// gradient can flow), with the in-place updated buffers' version counters bumped.
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
train_below_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, double eps, int64_t ghosts,
                     bool strided, const std::optional<at::Tensor>& renorm_mean,
                     const std::optional<at::Tensor>& renorm_std, std::optional<double> rmin,
                     std::optional<double> rmax, std::optional<double> dmax, bool relu,
                     const std::optional<at::Tensor>& running_mean,
                     const std::optional<at::Tensor>& running_var, double momentum,
                     const std::optional<at::Tensor>& sample_weight,
                     const std::optional<at::Tensor>& num_batches_tracked, bool guard,
                     const std::optional<at::Tensor>& running_std, double renorm_momentum,
                     bool biased) {
  at::AutoDispatchBelowADInplaceOrView below;
  static auto op = typed_op<decltype(bn_train)>("bnkit::bn_train");
  auto out = op.call(x, weight, bias, eps, ghosts, strided, renorm_mean, renorm_std, rmin, rmax,
                     dmax, relu, running_mean, running_var, momentum, sample_weight,
                     num_batches_tracked, guard, running_std, renorm_momentum, biased);
  bump_buffer_versions(running_mean, running_var, num_batches_tracked, running_std, renorm_mean,
                       renorm_std);
  return out;
}

// bn_eval's CPU kernel called below autograd (from EvalFunction, or directly).
static at::Tensor eval_below_autograd(const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& var,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, double eps,
                                      bool relu) {
  at::AutoDispatchBelowADInplaceOrView below;
  static auto op = typed_op<decltype(bn_eval)>("bnkit::bn_eval");
  return op.call(x, mean, var, weight, bias, eps, relu);
}

class TrainFunction : public torch::autograd::Function<TrainFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
      int64_t ghosts, bool strided, const std::optional<at::Tensor>& renorm_mean,
      const std::optional<at::Tensor>& renorm_std, std::optional<double> rmin,
      std::optional<double> rmax, std::optional<double> dmax, bool relu,
      const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
      double momentum, const std::optional<at::Tensor>& sample_weight,
      const std::optional<at::Tensor>& num_batches_tracked, bool guard,
      const std::optional<at::Tensor>& running_std, double renorm_momentum, bool biased) {
    auto [y, mean, var, r, d, updated] = train_below_autograd(
        x, weight, bias, eps, ghosts, strided, renorm_mean, renorm_std, rmin, rmax, dmax, relu,
        running_mean, running_var, momentum, sample_weight, num_batches_tracked, guard,
        running_std, renorm_momentum, biased);
    const bool renorm = has(renorm_std);
    // r and d are saved from the forward: the renorm buffers are updated in place after it.
    ctx->save_for_backward({x, has(weight) ? *weight : at::Tensor(), mean, var,
                            renorm ? r : at::Tensor(), renorm ? d : at::Tensor(),
                            relu ? y : at::Tensor(),
                            has(sample_weight) ? *sample_weight : at::Tensor()});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["ghosts"] = ghosts;
    ctx->saved_data["strided"] = strided;
    ctx->saved_data["bias"] = has(bias);
    ctx->mark_non_differentiable({r, d, updated});
    // Outputs without a gradient stay undefined in backward (no zero tensors to allocate).
    ctx->set_materialize_grads(false);
    return {y, mean, var, r, d, updated};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &var = saved[3];
    const at::Tensor &r = saved[4], &d = saved[5], &y = saved[6], &sw = saved[7];
    if (at::GradMode::is_enabled()) {
      // create_graph=True (a gradient penalty, a Hessian-vector product): the kernel's
      // gradient has no gradient of its own, so recompute the forward with differentiable
      // ATen operations and differentiate that instead.
      return differentiable_backward(ctx, grads, saved);
    }
    auto opt = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    const at::Tensor invstd = inverse_std(var, ctx->saved_data["eps"].toDouble());
    at::Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(x);
    static auto op = typed_op<decltype(bn_backward)>("bnkit::bn_backward");
    auto [gx, gw, gb] = op.call(grad_y, x, mean, invstd, opt(weight), opt(grads[1]),
                                opt(grads[2]), ctx->saved_data["ghosts"].toInt(),
                                ctx->saved_data["strided"].toBool(), opt(r), opt(d), opt(y),
                                opt(sw));
    // No gradient for the sample weights: callers send weights that need one elsewhere.
    torch::autograd::variable_list out(kTrainArguments);
    out[0] = gx;
    if (weight.defined()) out[1] = gw.to(weight.scalar_type());
    if (ctx->saved_data["bias"].toBool()) out[2] = gb;
    return out;
  }
};

// The first-order gradient of bn_train as a differentiable function of x, γ and the incoming
// gradients (for double backward): the training forward recomputed from x with ATen
// operations -- per (ghost, channel) weighted mean and biased variance, x̂, γ·(x̂·r + d) --
// and differentiated with create_graph. r, d and the ReLU mask are constants, as in the
// forward's own gradient.
static torch::autograd::variable_list differentiable_backward(
    torch::autograd::AutogradContext* ctx, const torch::autograd::variable_list& grads,
    const torch::autograd::variable_list& saved) {
  const at::Tensor &x = saved[0], &weight = saved[1], &r = saved[4], &d = saved[5];
  const at::Tensor &y = saved[6], &sw = saved[7];
  const double eps = ctx->saved_data["eps"].toDouble();
  const int64_t gs = ctx->saved_data["ghosts"].toInt();
  const bool strided = ctx->saved_data["strided"].toBool();
  const int64_t n = x.size(0), c = x.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // (N, C, ...) -> (G, N/G, C, L): ghost g's samples along dim 1.
  auto ghosted = [&](const at::Tensor& t, int64_t channels) {
    const at::Tensor flat = t.reshape({n, channels, -1});
    if (strided) return flat.reshape({n / gs, gs, channels, flat.size(2)}).transpose(0, 1);
    return flat.reshape({gs, n / gs, channels, flat.size(2)});
  };
  const at::Tensor xg = ghosted(x.to(acc), c);
  at::Tensor w;  // (G, N/G, 1, L or 1), or undefined
  if (sw.defined()) {
    const bool per_sample = sw.numel() == n;
    const std::vector<int64_t> shape =
        per_sample ? std::vector<int64_t>{n, 1} : std::vector<int64_t>{n, 1, -1};
    w = ghosted(sw.to(acc).reshape(shape), 1);
  }
  const std::vector<int64_t> dims = {1, 3};
  at::Tensor total, mu, centered, var;
  if (w.defined()) {
    total = (w * at::ones_like(xg.select(2, 0).unsqueeze(2))).sum(dims, true);
    mu = (w * xg).sum(dims, true) / total;
    centered = xg - mu;
    var = (w * centered * centered).sum(dims, true) / total;
  } else {
    mu = xg.mean(dims, true);
    centered = xg - mu;
    var = (centered * centered).mean(dims, true);
  }
  at::Tensor out = centered * at::rsqrt(var + eps);  // x̂
  at::Tensor scale = weight.defined() ? weight.to(acc).reshape({1, 1, c, 1}) : at::Tensor();
  if (r.defined()) {
    out = out * r.to(acc).reshape({1, 1, c, 1}) + d.to(acc).reshape({1, 1, c, 1});
  }
  if (scale.defined()) out = out * scale;
  at::Tensor dy =
      grads[0].defined() ? grads[0].to(acc) : at::zeros_like(x, x.options().dtype(acc));
  if (y.defined()) dy = dy * y.gt(0).to(acc);  // the ReLU's mask: a constant
  const at::Tensor dyg = ghosted(dy, c);
  std::vector<at::Tensor> outputs = {out}, seeds = {dyg};
  for (int i = 1; i <= 2; ++i) {  // the mean and var outputs' own gradients
    if (grads[i].defined()) {
      outputs.push_back((i == 1 ? mu : var).reshape({gs, c}));
      seeds.push_back(grads[i].to(acc).reshape({gs, c}));
    }
  }
  std::vector<at::Tensor> inputs;
  const bool want_x = ctx->needs_input_grad(0) && x.requires_grad();
  const bool want_w = weight.defined() && ctx->needs_input_grad(1) && weight.requires_grad();
  if (want_x) inputs.push_back(x);
  if (want_w) inputs.push_back(weight);
  torch::autograd::variable_list result(kTrainArguments);
  if (!inputs.empty()) {
    auto got = torch::autograd::grad(outputs, inputs, seeds, /*retain_graph=*/true,
                                     /*create_graph=*/true, /*allow_unused=*/true);
    size_t k = 0;
    if (want_x) result[0] = got[k++];
    if (want_w) result[1] = got[k++];
  }
  if (ctx->saved_data["bias"].toBool()) {
    result[2] = dyg.sum({0, 1, 3});  // dβ = Σ dy' over everything but the channel
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_train_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t ghosts, bool strided,
    const std::optional<at::Tensor>& renorm_mean, const std::optional<at::Tensor>& renorm_std,
    std::optional<double> rmin, std::optional<double> rmax, std::optional<double> dmax,
    bool relu, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum,
    const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& num_batches_tracked, bool guard,
    const std::optional<at::Tensor>& running_std, double renorm_momentum, bool biased) {
  const at::Tensor none;
  auto ptr = [&](const std::optional<at::Tensor>& t) { return has(t) ? &*t : &none; };
  if (!needs_autograd({&input, ptr(weight), ptr(bias), ptr(renorm_mean), ptr(renorm_std),
                       ptr(running_mean), ptr(running_var), ptr(sample_weight),
                       ptr(num_batches_tracked), ptr(running_std)})) {
    return train_below_autograd(input, weight, bias, eps, ghosts, strided, renorm_mean,
                                renorm_std, rmin, rmax, dmax, relu, running_mean, running_var,
                                momentum, sample_weight, num_batches_tracked, guard, running_std,
                                renorm_momentum, biased);
  }
  auto out = TrainFunction::apply(input, weight, bias, eps, ghosts, strided, renorm_mean,
                                  renorm_std, rmin, rmax, dmax, relu, running_mean, running_var,
                                  momentum, sample_weight, num_batches_tracked, guard,
                                  running_std, renorm_momentum, biased);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

// The autograd formula of bn_eval: y = act((x − μ)·k + β), k = γ/sqrt(σ² + eps) with the
// running statistics μ, σ² constant (buffers). dx = k·dy' in one pass (bn_eval_backward), dγ and
// dβ from its sums when asked for. A model in eval mode that needs gradients (input gradients,
// saliency, adversarial examples, fine-tuning with frozen batch norm) runs on the kernels too.
class EvalFunction : public torch::autograd::Function<EvalFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean,
      const at::Tensor& var, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, double eps, bool relu) {
    at::Tensor y = eval_below_autograd(x, mean, var, weight, bias, eps, relu);
    ctx->save_for_backward(
        {x, mean, var, has(weight) ? *weight : at::Tensor(), relu ? y : at::Tensor()});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias"] = has(bias);
    ctx->set_materialize_grads(false);
    return {y};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(7);  // x, mean, var, weight, bias, eps, relu
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &var = saved[2], &weight = saved[3];
    const at::Tensor& y = saved[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool want_w = weight.defined() && ctx->needs_input_grad(3);
    const bool want_b = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(4);
    if (at::GradMode::is_enabled()) {
      // create_graph=True: the same formula with differentiable ATen operations.
      const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      std::vector<int64_t> shape(x.dim(), 1), dims;
      shape[1] = x.size(1);
      for (int64_t d = 0; d < x.dim(); ++d) {
        if (d != 1) dims.push_back(d);
      }
      const at::Tensor invstd = at::rsqrt(var.to(acc) + eps).reshape(shape);
      at::Tensor dy = grads[0].to(acc);
      if (y.defined()) dy = dy * y.gt(0).to(acc);  // the ReLU's mask: a constant
      const at::Tensor k = weight.defined() ? weight.to(acc).reshape(shape) * invstd : invstd;
      out[0] = (dy * k).to(x.scalar_type());
      if (want_w) {
        const at::Tensor xhat = (x.to(acc) - mean.to(acc).reshape(shape)) * invstd;
        out[3] = (dy * xhat).sum(dims).to(weight.scalar_type());
      }
      if (want_b) out[4] = dy.sum(dims);
      return out;
    }
    auto opt = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    static auto op = typed_op<decltype(bn_eval_backward)>("bnkit::bn_eval_backward");
    auto [gx, gw, gb] = op.call(grads[0], x, mean, var, opt(weight), eps, opt(y), want_w || want_b);
    out[0] = gx;
    if (want_w) out[3] = gw.to(weight.scalar_type());
    if (want_b) out[4] = gb;
    return out;
  }
};

at::Tensor bn_eval_autograd(const at::Tensor& input, const at::Tensor& mean,
                            const at::Tensor& var, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps, bool relu) {
  const at::Tensor none;
  auto ptr = [&](const std::optional<at::Tensor>& t) { return has(t) ? &*t : &none; };
  if (!needs_autograd({&input, &mean, &var, ptr(weight), ptr(bias)})) {
    return eval_below_autograd(input, mean, var, weight, bias, eps, relu);
  }
  return EvalFunction::apply(input, mean, var, weight, bias, eps, relu)[0];
}

// ------------------------------------------------------------------------------ pool control

int64_t pool_cached_bytes() { return OutputPool::instance().cached_bytes(); }

// Sets the pool's limit and returns the previous one; a negative value only reads it.
int64_t pool_set_limit(int64_t bytes) {
  OutputPool& pool = OutputPool::instance();
  const int64_t old = pool.limit();
  if (bytes >= 0) pool.set_limit(bytes);
  return old;
}

// Sets the streaming-store threshold in bytes and returns the previous one; a negative value
// only reads it. -1 where this build has no streaming stores (not x86-64).
int64_t stream_set_threshold(int64_t bytes) {
  if (!kCanStream) return -1;
  const int64_t old = stream_threshold.load();
  if (bytes >= 0) stream_threshold.store(bytes);
  return old;
}

}  // namespace bnkit_cpu

TORCH_LIBRARY_FRAGMENT(bnkit, m) {
  m.def("bn_stats(Tensor x, bool float64=False, Tensor? sample_weight=None) -> (Tensor, Tensor)");
  m.def(
      "bn_normalize(Tensor x, Tensor mean, Tensor scale, Tensor shift, bool relu=False) -> "
      "Tensor");
  m.def(
      "bn_eval(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
      "bool relu=False) -> Tensor");
  m.def(
      "bn_train(Tensor x, Tensor? weight, Tensor? bias, float eps, int ghosts=1, "
      "bool strided=False, Tensor(e!)? renorm_mean=None, Tensor(f!)? renorm_std=None, "
      "float? rmin=None, float? rmax=None, float? dmax=None, bool relu=False, "
      "Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, float momentum=0.0, "
      "Tensor? sample_weight=None, Tensor(c!)? num_batches_tracked=None, bool guard=False, "
      "Tensor(d!)? running_std=None, float renorm_momentum=0.0, bool biased=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor? grad_mean=None, Tensor? grad_var=None, int ghosts=1, bool strided=False, "
      "Tensor? r=None, Tensor? d=None, Tensor? output=None, Tensor? sample_weight=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_eval_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor var, Tensor? weight, "
      "float eps, Tensor? output=None, bool param_grads=True) -> (Tensor, Tensor, Tensor)");
  m.def("bn_grad_sums(Tensor grad_out, Tensor x, Tensor mean, Tensor? output=None) -> Tensor");
  m.def(
      "bn_grad_apply(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor grad_mean, Tensor grad_var, float count, Tensor? output=None, "
      "Tensor? sample_weight=None) -> Tensor");
  m.def("pool_cached_bytes() -> int", &bnkit_cpu::pool_cached_bytes);
  m.def("pool_set_limit(int bytes) -> int", &bnkit_cpu::pool_set_limit);
  m.def("stream_set_threshold(int bytes) -> int", &bnkit_cpu::stream_set_threshold);
}

TORCH_LIBRARY_IMPL(bnkit, CPU, m) {
  m.impl("bn_stats", &bnkit_cpu::bn_stats);
  m.impl("bn_normalize", &bnkit_cpu::bn_normalize);
  m.impl("bn_eval", &bnkit_cpu::bn_eval);
  m.impl("bn_train", &bnkit_cpu::bn_train);
  m.impl("bn_backward", &bnkit_cpu::bn_backward);
  m.impl("bn_eval_backward", &bnkit_cpu::bn_eval_backward);
  m.impl("bn_grad_sums", &bnkit_cpu::bn_grad_sums);
  m.impl("bn_grad_apply", &bnkit_cpu::bn_grad_apply);
}

TORCH_LIBRARY_IMPL(bnkit, Autograd, m) {
  m.impl("bn_train", &bnkit_cpu::bn_train_autograd);
  m.impl("bn_eval", &bnkit_cpu::bn_eval_autograd);
}

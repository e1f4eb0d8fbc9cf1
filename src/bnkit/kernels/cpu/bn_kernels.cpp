// bnkit's CPU batch-norm kernels (opt-in; not used by bnkit.functional yet).
//
// Operators (namespace bnkit, schemas below):
//   bn_stats(x) -> (mean, var)            per-channel mean and biased variance, one pass
//   bn_normalize(x, mean, scale, shift)   y = (x - mean_c) * scale_c + shift_c, one pass
//   bn_eval(x, mean, var, weight?, bias?, eps)
//                                         y = (x - mean_c) * gamma_c / sqrt(var_c + eps) + beta_c
//   bn_backward(dy, x, mean, invstd, weight?, grad_mean?, grad_var?) -> (dx, dweight, dbias)
//                                         training backward: Σdy and Σdy·(x - mean) in one pass
//                                         (double per run, as bn_stats), dx in a second pass
//   bn_train(x, weight?, bias?, eps) -> (y, mean, var)
//                                         training forward: bn_stats then the normalize pass
//                                         (autograd registered from Python with bn_backward)
//
// Layouts: channels on dim 1. A tensor is seen either as "blocks" (outer, C, inner) when it is
// contiguous (NCHW, NCL, NCDHW) or as "rows" (rows, C) when its channels are innermost
// (channels-last memory formats, 2-D (N, C) input). Anything else is made contiguous first.
//
// Statistics: every value is shifted by K_c, the channel's first element, so large-mean data
// does not cancel; runs of at most kChunk values are summed in the input precision
// (S1 = sum(x - K), S2 = sum((x - K)^2)) and the run sums are added in double. Then
// mean = K + S1/n and var = S2/n - (S1/n)^2 in double (clamped at 0). With K a sample of the
// channel, |S1/n| is a few standard deviations and the subtraction loses little.
//
// Threads: at::parallel_for (torch.get_num_threads()).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace bnkit_cpu {

constexpr int64_t kChunk = 2048;  // longest run summed in the input precision

struct View {
  at::Tensor x;  // the tensor the kernels read (x itself, or a contiguous copy)
  bool rows;     // true: (rows, C) with C innermost; false: (outer, C, inner) contiguous
  int64_t outer, channels, inner;
};

static View view_of(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "bnkit: expected input with at least 2 dims, got ",
              input.dim());
  const int64_t c = input.size(1);
  const int64_t numel = input.numel();
  View v;
  v.channels = c;
  if (input.dim() == 2 && input.is_contiguous()) {
    v.x = input;
    v.rows = true;
    v.outer = input.size(0);
    v.inner = 1;
    return v;
  }
  if (input.movedim(1, -1).is_contiguous() && !input.is_contiguous()) {
    v.x = input;
    v.rows = true;
    v.outer = c == 0 ? 0 : numel / c;
    v.inner = 1;
    return v;
  }
  v.x = input.contiguous();
  v.rows = false;
  v.outer = input.size(0);
  v.inner = (v.outer == 0 || c == 0) ? 0 : numel / (v.outer * c);
  if (v.inner == 1) v.rows = true;  // (N, C, 1, ...) is (N, C) rows: vectorize over C
  return v;
}

static void check_channel_vector(const at::Tensor& t, const View& v, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == v.channels, "bnkit: ", name,
              " must have shape (C,) = (", v.channels, ",), got ", t.sizes());
}

// ------------------------------------------------------------------------------ statistics

template <typename scalar_t>
static void stats_blocks(const View& v, const scalar_t* x, double* mean, double* var) {
  const int64_t n_outer = v.outer, c_count = v.channels, inner = v.inner;
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  const int64_t tasks = n_outer * c_count * chunks;
  // Per (sample, channel, chunk) shifted sums, merged per channel afterwards (small).
  std::vector<double> s1(tasks), s2(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t chunk = t % chunks;
      const int64_t block = t / chunks;  // n * C + c
      const int64_t c = block % c_count;
      const scalar_t k = x[c * inner];  // first element of channel c (sample 0)
      const scalar_t* p = x + block * inner + chunk * kChunk;
      const int64_t len = std::min(kChunk, inner - chunk * kChunk);
      scalar_t a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t i = 0; i < len; ++i) {
        const scalar_t d = p[i] - k;
        a1 += d;
        a2 += d * d;
      }
      s1[t] = a1;
      s2[t] = a2;
    }
  });
  at::parallel_for(0, c_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double t1 = 0, t2 = 0;
      for (int64_t n = 0; n < n_outer; ++n) {
        const int64_t base = (n * c_count + c) * chunks;
        for (int64_t j = 0; j < chunks; ++j) {
          t1 += s1[base + j];
          t2 += s2[base + j];
        }
      }
      const double count = static_cast<double>(n_outer * inner);
      const double d = t1 / count;
      mean[c] = static_cast<double>(x[c * inner]) + d;
      var[c] = std::max(t2 / count - d * d, 0.0);
    }
  });
}

template <typename scalar_t>
static void stats_rows(const View& v, const scalar_t* x, double* mean, double* var) {
  const int64_t rows = v.outer, c_count = v.channels;
  // Rows per run summed in the input precision, so a run holds about kChunk values per
  // channel at most and at least a few rows of work.
  const int64_t run =
      std::max<int64_t>(1, std::min<int64_t>(kChunk, 65536 / std::max<int64_t>(c_count, 1)));
  const int64_t runs = (rows + run - 1) / run;
  // Per-thread float64 partials, indexed by at::get_thread_num(). Called from inside another
  // parallel region, parallel_for runs inline on the caller's thread: use one slot then.
  const bool nested = at::in_parallel_region();
  const int threads = nested ? 1 : std::max(1, at::get_num_threads());
  std::vector<double> t1(static_cast<size_t>(threads) * c_count, 0.0);
  std::vector<double> t2(static_cast<size_t>(threads) * c_count, 0.0);
  const scalar_t* k = x;  // row 0: each channel's first element
  auto body = [&](int64_t begin, int64_t end) {
    const int tid = nested ? 0 : at::get_thread_num();
    TORCH_CHECK(tid >= 0 && tid < threads, "bnkit::bn_stats: unexpected thread id ", tid);
    double* d1 = t1.data() + static_cast<size_t>(tid) * c_count;
    double* d2 = t2.data() + static_cast<size_t>(tid) * c_count;
    std::vector<scalar_t> a1(c_count), a2(c_count);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(a1.begin(), a1.end(), scalar_t(0));
      std::fill(a2.begin(), a2.end(), scalar_t(0));
      scalar_t* q1 = a1.data();
      scalar_t* q2 = a2.data();
      const int64_t first = r * run, last = std::min(rows, first + run);
      for (int64_t row = first; row < last; ++row) {
        const scalar_t* p = x + row * c_count;
#pragma omp simd
        for (int64_t c = 0; c < c_count; ++c) {
          const scalar_t d = p[c] - k[c];
          q1[c] += d;
          q2[c] += d * d;
        }
      }
      for (int64_t c = 0; c < c_count; ++c) {
        d1[c] += q1[c];
        d2[c] += q2[c];
      }
    }
  };
  if (nested) {
    body(0, runs);
  } else {
    at::parallel_for(0, runs, 1, body);
  }
  const double count = static_cast<double>(rows);
  for (int64_t c = 0; c < c_count; ++c) {
    double s1 = 0, s2 = 0;
    for (int t = 0; t < threads; ++t) {
      s1 += t1[static_cast<size_t>(t) * c_count + c];
      s2 += t2[static_cast<size_t>(t) * c_count + c];
    }
    const double d = s1 / count;
    mean[c] = static_cast<double>(k[c]) + d;
    var[c] = std::max(s2 / count - d * d, 0.0);
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "bnkit::bn_stats: CPU tensors only");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "bnkit::bn_stats: float32 or float64 input, got ", dtype);
  const View v = view_of(input);
  TORCH_CHECK(v.channels == 0 || v.outer * v.inner > 0,
              "bnkit::bn_stats: no values per channel (shape ", input.sizes(), ")");
  auto opts = input.options().dtype(at::kDouble);
  at::Tensor mean = at::empty({v.channels}, opts);
  at::Tensor var = at::empty({v.channels}, opts);
  if (v.channels > 0) {
    if (dtype == at::kFloat) {
      const float* x = v.x.const_data_ptr<float>();
      if (v.rows) {
        stats_rows<float>(v, x, mean.data_ptr<double>(), var.data_ptr<double>());
      } else {
        stats_blocks<float>(v, x, mean.data_ptr<double>(), var.data_ptr<double>());
      }
    } else {
      const double* x = v.x.const_data_ptr<double>();
      if (v.rows) {
        stats_rows<double>(v, x, mean.data_ptr<double>(), var.data_ptr<double>());
      } else {
        stats_blocks<double>(v, x, mean.data_ptr<double>(), var.data_ptr<double>());
      }
    }
  }
  return {mean.to(dtype), var.to(dtype)};
}

// ------------------------------------------------------------------------------ normalize

template <typename scalar_t>
static void normalize_kernel(const View& v, const scalar_t* x, scalar_t* y, const scalar_t* m,
                             const scalar_t* a, const scalar_t* b) {
  const int64_t c_count = v.channels;
  if (v.rows) {
    const int64_t rows = v.outer;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(c_count, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* p = x + row * c_count;
        scalar_t* q = y + row * c_count;
#pragma omp simd
        for (int64_t c = 0; c < c_count; ++c) {
          q[c] = (p[c] - m[c]) * a[c] + b[c];
        }
      }
    });
    return;
  }
  const int64_t inner = v.inner;
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  const int64_t tasks = v.outer * c_count * chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t chunk = t % chunks;
      const int64_t block = t / chunks;
      const int64_t c = block % c_count;
      const int64_t offset = block * inner + chunk * kChunk;
      const int64_t len = std::min(kChunk, inner - chunk * kChunk);
      const scalar_t mc = m[c], ac = a[c], bc = b[c];
      const scalar_t* p = x + offset;
      scalar_t* q = y + offset;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        q[i] = (p[i] - mc) * ac + bc;
      }
    }
  });
}

static at::Tensor output_like(const View& v, const at::Tensor& input) {
  // Same memory format as the input: the channels-last "rows" view needs y's strides to
  // match x's; empty_like preserves the strides of a dense, non-overlapping tensor.
  at::Tensor y = at::empty_like(v.x);
  TORCH_CHECK(y.strides() == v.x.strides(), "bnkit: unexpected output strides");
  (void)input;
  return y;
}

static void check_input(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "bnkit: CPU tensors only");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "bnkit: float32 or float64 input, got ", dtype);
}

// Per-channel vector as contiguous values of type T (no copy when it already is).
template <typename T>
static std::vector<T> channel_values(const at::Tensor& t) {
  at::Tensor c = t.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const T* p = c.const_data_ptr<T>();
  return std::vector<T>(p, p + c.numel());
}

template <typename scalar_t>
static at::Tensor run_normalize(const View& v, const std::vector<scalar_t>& m,
                                const std::vector<scalar_t>& a, const std::vector<scalar_t>& b) {
  at::Tensor y = output_like(v, v.x);
  if (v.x.numel() == 0) return y;
  normalize_kernel<scalar_t>(v, v.x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                             m.data(), a.data(), b.data());
  return y;
}

at::Tensor bn_normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                        const at::Tensor& shift) {
  check_input(input);
  const View v = view_of(input);
  check_channel_vector(mean, v, "mean");
  check_channel_vector(scale, v, "scale");
  check_channel_vector(shift, v, "shift");
  if (input.scalar_type() == at::kFloat) {
    return run_normalize<float>(v, channel_values<float>(mean), channel_values<float>(scale),
                                channel_values<float>(shift));
  }
  return run_normalize<double>(v, channel_values<double>(mean), channel_values<double>(scale),
                               channel_values<double>(shift));
}

template <typename scalar_t>
static at::Tensor eval_impl(const View& v, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps) {
  // Fold in double: scale = gamma / sqrt(var + eps), shift = beta; then round to scalar_t.
  const int64_t c = v.channels;
  const std::vector<double> vv = channel_values<double>(var);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  if (has_w) check_channel_vector(*weight, v, "weight");
  if (has_b) check_channel_vector(*bias, v, "bias");
  const std::vector<double> w = has_w ? channel_values<double>(*weight) : std::vector<double>();
  std::vector<scalar_t> a(c), b(c);
  if (has_b) {
    b = channel_values<scalar_t>(*bias);
  } else {
    std::fill(b.begin(), b.end(), scalar_t(0));
  }
  for (int64_t i = 0; i < c; ++i) {
    a[i] = static_cast<scalar_t>((has_w ? w[i] : 1.0) / std::sqrt(vv[i] + eps));
  }
  return run_normalize<scalar_t>(v, channel_values<scalar_t>(mean), a, b);
}

at::Tensor bn_eval(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   double eps) {
  check_input(input);
  const View v = view_of(input);
  check_channel_vector(mean, v, "mean");
  check_channel_vector(var, v, "var");
  if (input.scalar_type() == at::kFloat) {
    return eval_impl<float>(v, mean, var, weight, bias, eps);
  }
  return eval_impl<double>(v, mean, var, weight, bias, eps);
}

// ------------------------------------------------------------------------------ backward

// Σdy and Σdy·(x - mean) per channel, in double (runs in the input precision, as bn_stats).
template <typename scalar_t>
static void backward_sums(const View& v, const scalar_t* x, const scalar_t* dy,
                          const scalar_t* m, double* sum_dy, double* sum_dyx) {
  const int64_t c_count = v.channels;
  if (v.rows) {
    const int64_t rows = v.outer;
    const int64_t run =
        std::max<int64_t>(1, std::min<int64_t>(kChunk, 65536 / std::max<int64_t>(c_count, 1)));
    const int64_t runs = (rows + run - 1) / run;
    const bool nested = at::in_parallel_region();
    const int threads = nested ? 1 : std::max(1, at::get_num_threads());
    std::vector<double> t1(static_cast<size_t>(threads) * c_count, 0.0);
    std::vector<double> t2(static_cast<size_t>(threads) * c_count, 0.0);
    auto body = [&](int64_t begin, int64_t end) {
      const int tid = nested ? 0 : at::get_thread_num();
      TORCH_CHECK(tid >= 0 && tid < threads, "bnkit::bn_backward: unexpected thread id ", tid);
      double* d1 = t1.data() + static_cast<size_t>(tid) * c_count;
      double* d2 = t2.data() + static_cast<size_t>(tid) * c_count;
      std::vector<scalar_t> a1(c_count), a2(c_count);
      for (int64_t r = begin; r < end; ++r) {
        std::fill(a1.begin(), a1.end(), scalar_t(0));
        std::fill(a2.begin(), a2.end(), scalar_t(0));
        scalar_t* q1 = a1.data();
        scalar_t* q2 = a2.data();
        const int64_t first = r * run, last = std::min(rows, first + run);
        for (int64_t row = first; row < last; ++row) {
          const scalar_t* p = x + row * c_count;
          const scalar_t* g = dy + row * c_count;
#pragma omp simd
          for (int64_t c = 0; c < c_count; ++c) {
            q1[c] += g[c];
            q2[c] += g[c] * (p[c] - m[c]);
          }
        }
        for (int64_t c = 0; c < c_count; ++c) {
          d1[c] += q1[c];
          d2[c] += q2[c];
        }
      }
    };
    if (nested) {
      body(0, runs);
    } else {
      at::parallel_for(0, runs, 1, body);
    }
    for (int64_t c = 0; c < c_count; ++c) {
      double s1 = 0, s2 = 0;
      for (int t = 0; t < threads; ++t) {
        s1 += t1[static_cast<size_t>(t) * c_count + c];
        s2 += t2[static_cast<size_t>(t) * c_count + c];
      }
      sum_dy[c] = s1;
      sum_dyx[c] = s2;
    }
    return;
  }
  const int64_t n_outer = v.outer, inner = v.inner;
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  const int64_t tasks = n_outer * c_count * chunks;
  std::vector<double> s1(tasks), s2(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t chunk = t % chunks;
      const int64_t block = t / chunks;
      const int64_t c = block % c_count;
      const int64_t offset = block * inner + chunk * kChunk;
      const int64_t len = std::min(kChunk, inner - chunk * kChunk);
      const scalar_t mc = m[c];
      const scalar_t* p = x + offset;
      const scalar_t* g = dy + offset;
      scalar_t a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t i = 0; i < len; ++i) {
        a1 += g[i];
        a2 += g[i] * (p[i] - mc);
      }
      s1[t] = a1;
      s2[t] = a2;
    }
  });
  at::parallel_for(0, c_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double u1 = 0, u2 = 0;
      for (int64_t n = 0; n < n_outer; ++n) {
        const int64_t base = (n * c_count + c) * chunks;
        for (int64_t j = 0; j < chunks; ++j) {
          u1 += s1[base + j];
          u2 += s2[base + j];
        }
      }
      sum_dy[c] = u1;
      sum_dyx[c] = u2;
    }
  });
}

// grad_x = a_c·dy + b_c·(x - mean_c) + d_c, one pass.
template <typename scalar_t>
static void backward_apply(const View& v, const scalar_t* x, const scalar_t* dy, scalar_t* gx,
                           const scalar_t* m, const scalar_t* a, const scalar_t* b,
                           const scalar_t* d) {
  const int64_t c_count = v.channels;
  if (v.rows) {
    const int64_t rows = v.outer;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(c_count, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* p = x + row * c_count;
        const scalar_t* g = dy + row * c_count;
        scalar_t* q = gx + row * c_count;
#pragma omp simd
        for (int64_t c = 0; c < c_count; ++c) {
          q[c] = a[c] * g[c] + b[c] * (p[c] - m[c]) + d[c];
        }
      }
    });
    return;
  }
  const int64_t inner = v.inner;
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  const int64_t tasks = v.outer * c_count * chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t chunk = t % chunks;
      const int64_t block = t / chunks;
      const int64_t c = block % c_count;
      const int64_t offset = block * inner + chunk * kChunk;
      const int64_t len = std::min(kChunk, inner - chunk * kChunk);
      const scalar_t mc = m[c], ac = a[c], bc = b[c], dc = d[c];
      const scalar_t* p = x + offset;
      const scalar_t* g = dy + offset;
      scalar_t* q = gx + offset;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        q[i] = ac * g[i] + bc * (p[i] - mc) + dc;
      }
    }
  });
}

// dy in the same memory layout as the view of x (strides equal), copying only when needed.
static at::Tensor like_view(const at::Tensor& t, const View& v) {
  if (t.strides() == v.x.strides()) return t;
  if (v.rows) {
    at::Tensor moved = t.movedim(1, -1).contiguous().movedim(-1, 1);
    TORCH_CHECK(moved.strides() == v.x.strides(), "bnkit: unexpected grad_out strides");
    return moved;
  }
  return t.contiguous();
}

template <typename scalar_t>
static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const View& v, const at::Tensor& dy_in, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& grad_mean,
    const std::optional<at::Tensor>& grad_var) {
  const int64_t c_count = v.channels;
  const at::Tensor dy = like_view(dy_in.to(v.x.scalar_type()), v);
  const std::vector<scalar_t> m = channel_values<scalar_t>(mean);
  const std::vector<double> is = channel_values<double>(invstd);
  const bool has_w = weight.has_value() && weight->defined();
  if (has_w) check_channel_vector(*weight, v, "weight");
  const std::vector<double> w = has_w ? channel_values<double>(*weight) : std::vector<double>();
  const bool has_gm = grad_mean.has_value() && grad_mean->defined();
  const bool has_gv = grad_var.has_value() && grad_var->defined();
  if (has_gm) check_channel_vector(*grad_mean, v, "grad_mean");
  if (has_gv) check_channel_vector(*grad_var, v, "grad_var");
  const std::vector<double> gm =
      has_gm ? channel_values<double>(*grad_mean) : std::vector<double>();
  const std::vector<double> gv = has_gv ? channel_values<double>(*grad_var) : std::vector<double>();
  std::vector<double> sum_dy(c_count, 0.0), sum_dyx(c_count, 0.0);
  at::Tensor gx = output_like(v, v.x);
  const int64_t n = v.outer * v.inner;
  if (v.x.numel() > 0) {
    backward_sums<scalar_t>(v, v.x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                            m.data(), sum_dy.data(), sum_dyx.data());
    const double count = static_cast<double>(n);
    std::vector<scalar_t> a(c_count), b(c_count), d(c_count);
    for (int64_t c = 0; c < c_count; ++c) {
      const double k = (has_w ? w[c] : 1.0) * is[c];  // γ·invstd
      // grad_x = k·(dy - Σdy/n - x̂·Σdy·x̂/n), x̂ = (x - μ)·invstd, Σdy·x̂ = invstd·Σdy(x - μ);
      // plus the mean and (biased) variance outputs' own gradients: gm/n + 2·gv·(x - μ)/n.
      double bc = -k * is[c] * is[c] * sum_dyx[c] / count;
      double dc = -k * sum_dy[c] / count;
      if (has_gm) dc += gm[c] / count;
      if (has_gv) bc += 2.0 * gv[c] / count;
      a[c] = static_cast<scalar_t>(k);
      b[c] = static_cast<scalar_t>(bc);
      d[c] = static_cast<scalar_t>(dc);
    }
    backward_apply<scalar_t>(v, v.x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                             gx.data_ptr<scalar_t>(), m.data(), a.data(), b.data(), d.data());
  }
  auto opts = v.x.options().dtype(at::kDouble);
  at::Tensor grad_bias = at::empty({c_count}, opts);
  at::Tensor grad_weight = at::empty({c_count}, opts);
  double* gb = grad_bias.data_ptr<double>();
  double* gw = grad_weight.data_ptr<double>();
  for (int64_t c = 0; c < c_count; ++c) {
    gb[c] = sum_dy[c];
    gw[c] = sum_dyx[c] * is[c];
  }
  const auto dtype = v.x.scalar_type();
  return {gx, grad_weight.to(dtype), grad_bias.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_mean, const std::optional<at::Tensor>& grad_var) {
  check_input(input);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bnkit::bn_backward: grad_out shape ",
              grad_out.sizes(), " differs from x shape ", input.sizes());
  TORCH_CHECK(grad_out.device().is_cpu(), "bnkit: CPU tensors only");
  const View v = view_of(input);
  TORCH_CHECK(v.channels == 0 || v.outer * v.inner > 0,
              "bnkit::bn_backward: no values per channel (shape ", input.sizes(), ")");
  check_channel_vector(mean, v, "mean");
  check_channel_vector(invstd, v, "invstd");
  if (input.scalar_type() == at::kFloat) {
    return backward_impl<float>(v, grad_out, mean, invstd, weight, grad_mean, grad_var);
  }
  return backward_impl<double>(v, grad_out, mean, invstd, weight, grad_mean, grad_var);
}

// ------------------------------------------------------------------------------ training forward

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train(const at::Tensor& input,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        double eps) {
  check_input(input);
  auto [mean, var] = bn_stats(input);
  const View v = view_of(input);
  // The normalize is bn_eval's pass with the batch statistics (fold in double).
  at::Tensor y = input.scalar_type() == at::kFloat
                     ? eval_impl<float>(v, mean, var, weight, bias, eps)
                     : eval_impl<double>(v, mean, var, weight, bias, eps);
  return {y, mean, var};
}

}  // namespace bnkit_cpu

TORCH_LIBRARY_FRAGMENT(bnkit, m) {
  m.def("bn_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_normalize(Tensor x, Tensor mean, Tensor scale, Tensor shift) -> Tensor");
  m.def(
      "bn_eval(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> "
      "Tensor");
  m.def(
      "bn_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor? grad_mean=None, Tensor? grad_var=None) -> (Tensor, Tensor, Tensor)");
  m.def("bn_train(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnkit, CPU, m) {
  m.impl("bn_stats", &bnkit_cpu::bn_stats);
  m.impl("bn_normalize", &bnkit_cpu::bn_normalize);
  m.impl("bn_eval", &bnkit_cpu::bn_eval);
  m.impl("bn_backward", &bnkit_cpu::bn_backward);
  m.impl("bn_train", &bnkit_cpu::bn_train);
}

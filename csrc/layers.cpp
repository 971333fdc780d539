// fastmaml task-batched layer kernels on the CPU: convolutions parallel over tasks, and the fused
// BatchNorm (per-task batch statistics) + activation + 2x2 max-pool block in four passes (forward,
// backward, R-forward, R-backward; docs/engine.md section 9).
//
// The semantics are exactly those of fastmaml/layers/reference.py (every tensor carries the task
// dimension T first; activations [T, N, C, H, W]); fastmaml/layers/cpp.py wraps these ops with the
// reference's Python signatures (None for the optional outputs returned here as empty tensors).
//
// Convolutions: at::parallel_for over tasks (grain 1), each task's convolution run by ATen
// (oneDNN / MKL GEMMs) single-threaded inside the parallel region and written into a preallocated
// [T, ...] output. Small convolutions scale far better across tasks than inside one batch.
//
// BatchNorm blocks: float and double; one work item per (task, channel), a FIXED decomposition
// (never derived from the thread count), each item computing its reductions in double in a fixed
// order with kLanes independent partial sums, so every result is bit-identical for any number of
// threads. Each item makes two passes over its N slices of H*W contiguous elements: the
// reductions, then the elementwise output. Elementwise values are computed in the input dtype in
// the reference's order (xh = (z - mean) * rstd, a = gamma * xh + beta) so that every pass sees
// the same activation mask; the max-pool indices are those of the forward (first maximum on ties,
// as torch's max picks it).

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Our loops only (after the includes): without this GCC keeps `a > 0 ? ...` as control flow
// (a compare may trap) and vectorizes none of the elementwise loops. It changes no result: no
// reassociation, no contraction, only the assumption that floating-point exceptions are not trapped.
#pragma GCC optimize("no-trapping-math")

namespace fastmaml {
namespace layers {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

constexpr int kLanes = 8;  // independent partial sums per reduction (the compiler vectorizes them)

inline bool has(const OptT& t) { return t.has_value() && t->defined(); }

Tensor empty0(const Tensor& like) { return at::empty({0}, like.options()); }

// Inside our parallel region, the libraries a task's convolution calls must see ONE thread.
// oneDNN plans a primitive for omp_get_max_threads() threads (still the outer count inside a
// parallel region) and then, nested, runs only the first thread's share: its weight gradient came
// out as garbage at 2 threads. nthreads-var is a per-task ICV: setting it here changes nothing
// outside this parallel region's implicit task, and it is restored anyway.
struct SingleThreadedLibs {
#ifdef _OPENMP
  int prev;
  SingleThreadedLibs() {
    // ATen sets this thread's thread count on its first parallel call in the thread (from
    // at::set_num_threads): let that happen now, not inside the convolution, after our setting.
    at::internal::lazy_init_num_threads();
    prev = omp_get_max_threads();
    omp_set_num_threads(1);
  }
  ~SingleThreadedLibs() { omp_set_num_threads(prev); }
#endif
};

// ---------------------------------------------------------------------------------------------
// Convolution: y[t] = conv2d(x[t], w[t]) + b[t]
// ---------------------------------------------------------------------------------------------

void check_conv(const char* op, const Tensor& x, const Tensor& w) {
  TORCH_CHECK(x.dim() == 5, "fastmaml::", op, ": x must be [T, N, C, H, W], got ", x.sizes());
  TORCH_CHECK(w.dim() == 5, "fastmaml::", op, ": w must be [T, O, C, kh, kw], got ", w.sizes());
  TORCH_CHECK(w.size(0) == x.size(0) && w.size(2) == x.size(2), "fastmaml::", op,
              ": w ", w.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "fastmaml::", op, ": x and w dtypes differ");
}

int64_t conv_out(int64_t in, int64_t k, int64_t stride, int64_t padding) {
  return (in + 2 * padding - k) / stride + 1;
}

Tensor conv2d_tasks_cpu(const Tensor& x_, const Tensor& w_, const OptT& b_, int64_t stride,
                        int64_t padding) {
  check_conv("conv2d_tasks", x_, w_);
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  const bool hb = has(b_);
  Tensor b;
  if (hb) {
    b = b_->contiguous();
    TORCH_CHECK(b.dim() == 2 && b.size(0) == w.size(0) && b.size(1) == w.size(1),
                "fastmaml::conv2d_tasks: b must be [T, O], got ", b.sizes());
  }
  const int64_t T = x.size(0), N = x.size(1), O = w.size(1);
  const int64_t Ho = conv_out(x.size(3), w.size(3), stride, padding);
  const int64_t Wo = conv_out(x.size(4), w.size(4), stride, padding);
  Tensor y = at::empty({T, N, O, Ho, Wo}, x.options());
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    at::NoGradGuard no_grad;
    SingleThreadedLibs one_thread;
    for (int64_t t = t0; t < t1; ++t) {
      y[t].copy_(at::conv2d(x[t], w[t], hb ? b[t] : Tensor(), {stride, stride}, {padding, padding}));
    }
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> conv2d_tasks_backward_cpu(const Tensor& dy_, const Tensor& x_,
                                                             const Tensor& w_, int64_t stride,
                                                             int64_t padding, bool need_dx,
                                                             bool need_dw, bool need_bias) {
  check_conv("conv2d_tasks_backward", x_, w_);
  TORCH_CHECK(dy_.dim() == 5 && dy_.size(0) == x_.size(0) && dy_.size(1) == x_.size(1) &&
                  dy_.size(2) == w_.size(1),
              "fastmaml::conv2d_tasks_backward: dy ", dy_.sizes(), " does not match x ", x_.sizes(),
              " and w ", w_.sizes());
  const Tensor dy = dy_.contiguous();
  const int64_t T = x_.size(0);
  Tensor dx = need_dx ? at::empty(x_.sizes(), dy.options()) : empty0(dy);
  Tensor dw = need_dw ? at::empty(w_.sizes(), dy.options()) : empty0(dy);
  Tensor db = need_bias ? at::empty({T, w_.size(1)}, dy.options()) : empty0(dy);
  if (need_dx || need_dw) {
    // x only gives the shape when dw is not asked for (and w when dx is not): it may be expanded.
    const Tensor x = need_dw ? x_.contiguous() : x_;
    const Tensor w = need_dx ? w_.contiguous() : w_;
    const int64_t N = x_.size(1), O = w_.size(1), kh = w_.size(3), kw = w_.size(4);
    const int64_t Ckk = w_.size(2) * kh * kw, L = dy.size(3) * dy.size(4);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      at::NoGradGuard no_grad;
      SingleThreadedLibs one_thread;
      for (int64_t t = t0; t < t1; ++t) {
        if (need_dx) {
          auto r = at::convolution_backward(dy[t], x[t], w[t], std::nullopt, {stride, stride},
                                            {padding, padding}, {1, 1}, false, {0, 0}, 1,
                                            {true, false, false});
          dx[t].copy_(std::get<0>(r));
        }
        if (need_dw) {
          // dw[t] = sum_n dy[t, n] cols[n]^T (im2col + GEMM): oneDNN's weight gradient, run
          // from several threads at once, returned garbage for some tasks (a race inside it).
          const Tensor cols = at::im2col(x[t], {kh, kw}, {1, 1}, {padding, padding},
                                         {stride, stride});  // [N, C*kh*kw, L]
          const Tensor dyt = dy[t].view({N, O, L});
          Tensor dwt = dw[t].view({O, Ckk});
          at::mm_out(dwt, dyt[0], cols[0].t());
          for (int64_t n = 1; n < N; ++n) dwt.addmm_(dyt[n], cols[n].t());
        }
      }
    });
  }
  if (need_bias) {
    // db[t, o] = sum over (n, h, w) of dy[t, n, o]: like the reference's dy.sum(dim=(1, 3, 4)).
    at::sum_out(db, dy, {1, 3, 4});
  }
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------------------------
// BatchNorm + activation + max-pool
// ---------------------------------------------------------------------------------------------

struct Geo {
  int64_t T, N, C, H, W, HW, Ho, Wo, HWo, M;
  int pool;
  // element offset of slice (t, n, c) of an activation / of the pooled output
  int64_t in(int64_t t, int64_t n, int64_t c) const { return ((t * N + n) * C + c) * HW; }
  int64_t out(int64_t t, int64_t n, int64_t c) const { return ((t * N + n) * C + c) * HWo; }
};

Geo make_geo(const char* op, const Tensor& z, int64_t pool) {
  TORCH_CHECK(z.dim() == 5, "fastmaml::", op, ": z must be [T, N, C, H, W], got ", z.sizes());
  TORCH_CHECK(pool == 0 || pool == 2, "fastmaml::", op, ": pool must be 0 or 2, got ", pool);
  TORCH_CHECK(z.device().is_cpu(), "fastmaml::", op, ": CPU tensors only, got ", z.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, "fastmaml::", op,
              ": float32 or float64 only, got ", z.scalar_type());
  Geo g;
  g.T = z.size(0);
  g.N = z.size(1);
  g.C = z.size(2);
  g.H = z.size(3);
  g.W = z.size(4);
  g.HW = g.H * g.W;
  g.pool = static_cast<int>(pool);
  g.Ho = pool ? g.H / 2 : g.H;
  g.Wo = pool ? g.W / 2 : g.W;
  g.HWo = g.Ho * g.Wo;
  g.M = g.N * g.HW;
  TORCH_CHECK(g.M > 0, "fastmaml::", op, ": empty batch");
  return g;
}

std::vector<int64_t> out_shape(const Geo& g) { return {g.T, g.N, g.C, g.Ho, g.Wo}; }

// A [T, C] per-channel tensor (dtype of z), made dense.
Tensor chan(const char* op, const char* name, const Tensor& t, const Tensor& z, const Geo& g) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == g.T && t.size(1) == g.C, "fastmaml::", op, ": ", name,
              " must be [", g.T, ", ", g.C, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), "fastmaml::", op, ": ", name, " must have dtype ",
              z.scalar_type(), ", got ", t.scalar_type());
  return t.contiguous();
}

Tensor act_like(const char* op, const char* name, const Tensor& t, const Tensor& z,
                at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "fastmaml::", op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), "fastmaml::", op, ": ", name, " must have dtype ",
              z.scalar_type(), ", got ", t.scalar_type());
  return t.contiguous();
}

Tensor check_idx(const char* op, const OptT& idx, const Geo& g) {
  if (g.pool == 0) return Tensor();
  TORCH_CHECK(has(idx), "fastmaml::", op, ": idx is required when pool = 2");
  TORCH_CHECK(idx->scalar_type() == at::kByte, "fastmaml::", op, ": idx must be uint8, got ",
              idx->scalar_type());
  TORCH_CHECK(idx->sizes() == at::IntArrayRef(out_shape(g)), "fastmaml::", op,
              ": idx must have shape ", at::IntArrayRef(out_shape(g)), ", got ", idx->sizes());
  return idx->contiguous();
}

// Sum of kLanes partial sums, in a fixed order.
inline double lanes_sum(const double* a) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += a[l];
  return s;
}

// Full-resolution rows from the pooled gradient: row pair (2i, 2i+1) of dh gets d[i, j] at the
// window position idx[i, j], zero elsewhere; an odd last column / row is zero.
template <typename S>
inline void scatter_slice(const S* __restrict d, const uint8_t* __restrict k, S* __restrict dh,
                          const Geo& g) {
  const int64_t W = g.W, Wo = g.Wo;
  for (int64_t i = 0; i < g.Ho; ++i) {
    const S* __restrict di = d + i * Wo;
    const uint8_t* __restrict ki = k + i * Wo;
    S* __restrict r0 = dh + 2 * i * W;
    S* __restrict r1 = r0 + W;
    for (int64_t j = 0; j < Wo; ++j) {
      const S v = di[j];
      const int kk = ki[j];
      r0[2 * j] = kk == 0 ? v : S(0);
      r0[2 * j + 1] = kk == 1 ? v : S(0);
      r1[2 * j] = kk == 2 ? v : S(0);
      r1[2 * j + 1] = kk == 3 ? v : S(0);
    }
    if (W & 1) {
      r0[W - 1] = S(0);
      r1[W - 1] = S(0);
    }
  }
  if (g.H & 1) std::fill(dh + (g.H - 1) * W, dh + g.HW, S(0));
}

// Pooled value of each 2x2 window of h and its position (first maximum on ties; NaN wins).
template <typename S>
inline void maxpool_slice(const S* __restrict h, S* __restrict o, uint8_t* __restrict k,
                          const Geo& g) {
  const int64_t W = g.W, Wo = g.Wo;
  for (int64_t i = 0; i < g.Ho; ++i) {
    const S* __restrict r0 = h + 2 * i * W;
    const S* __restrict r1 = r0 + W;
    S* __restrict oi = o + i * Wo;
    uint8_t* __restrict ki = k + i * Wo;
    for (int64_t j = 0; j < Wo; ++j) {
      const S v[4] = {r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]};
      S m = v[0];
      uint8_t kk = 0;
      for (uint8_t q = 1; q < 4; ++q) {
        const bool take = (v[q] > m) | ((v[q] != v[q]) & (m == m));
        m = take ? v[q] : m;
        kk = take ? q : kk;
      }
      oi[j] = m;
      ki[j] = kk;
    }
  }
}

// The element of each window at the forward's position.
template <typename S>
inline void gather_slice(const S* __restrict r, const uint8_t* __restrict k, S* __restrict o,
                         const Geo& g) {
  const int64_t W = g.W, Wo = g.Wo;
  for (int64_t i = 0; i < g.Ho; ++i) {
    const S* __restrict r0 = r + 2 * i * W;
    const S* __restrict r1 = r0 + W;
    S* __restrict oi = o + i * Wo;
    const uint8_t* __restrict ki = k + i * Wo;
    for (int64_t j = 0; j < Wo; ++j) {
      const int kk = ki[j];
      const S a = kk & 1 ? r0[2 * j + 1] : r0[2 * j];
      const S b = kk & 1 ? r1[2 * j + 1] : r1[2 * j];
      oi[j] = kk & 2 ? b : a;
    }
  }
}

// ---- row helpers: every scalar by value and every pointer restrict-qualified, so that the
// compiler keeps the constants in registers and vectorizes. The activation multiplies by a
// select of two constants (1 or slope), as the reference does: `a > 0 ? a : a * slope` does not
// vectorize (GCC will not speculate the product under the default -ftrapping-math). ----

// acc[l] += z[j] (lanes l = j mod kLanes within the full blocks, the tail from lane 0)
template <typename S>
inline void sum_row(const S* __restrict z, int64_t n, double* __restrict acc_io) {
  double acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = acc_io[l];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(z[j + l]);
  for (int l = 0; j < n; ++j, ++l) acc[l] += static_cast<double>(z[j]);
  for (int l = 0; l < kLanes; ++l) acc_io[l] = acc[l];
}

// acc[l] += (z[j] - m)^2 in double
template <typename S>
inline void sqdev_row(const S* __restrict z, int64_t n, double m, double* __restrict acc_io) {
  double acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = acc_io[l];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const double d = static_cast<double>(z[j + l]) - m;
      acc[l] += d * d;
    }
  for (int l = 0; j < n; ++j, ++l) {
    const double d = static_cast<double>(z[j]) - m;
    acc[l] += d * d;
  }
  for (int l = 0; l < kLanes; ++l) acc_io[l] = acc[l];
}

// h = act(gamma * (z - mean) * rstd + beta)
template <typename S>
inline void fwd_row(const S* __restrict z, S* __restrict h, int64_t n, S mean, S rstd, S ga, S be,
                    S slope) {
  for (int64_t j = 0; j < n; ++j) {
    const S xh = (z[j] - mean) * rstd;
    const S a = ga * xh + be;
    h[j] = a * (a > S(0) ? S(1) : slope);  // a select of constants: vectorizes
  }
}

// da = d * act'(a)
template <typename S>
inline void da_row(const S* __restrict z, const S* __restrict d, S* __restrict da, int64_t n,
                   S mean, S rstd, S ga, S be, S slope) {
  for (int64_t j = 0; j < n; ++j) {
    const S xh = (z[j] - mean) * rstd;
    const S a = ga * xh + be;
    da[j] = d[j] * (a > S(0) ? S(1) : slope);
  }
}

// a1 += v, a2 += v * xh  (v = da or rz)
template <typename S>
inline void sum2_row(const S* __restrict z, const S* __restrict v, int64_t n, S mean, S rstd,
                     double* __restrict a1_io, double* __restrict a2_io) {
  double a1[kLanes], a2[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    a1[l] = a1_io[l];
    a2[l] = a2_io[l];
  }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const double xh = static_cast<double>((z[j + l] - mean) * rstd);
      const double d = static_cast<double>(v[j + l]);
      a1[l] += d;
      a2[l] += d * xh;
    }
  for (int l = 0; j < n; ++j, ++l) {
    const double xh = static_cast<double>((z[j] - mean) * rstd);
    const double d = static_cast<double>(v[j]);
    a1[l] += d;
    a2[l] += d * xh;
  }
  for (int l = 0; l < kLanes; ++l) {
    a1_io[l] = a1[l];
    a2_io[l] = a2[l];
  }
}

// dz = rstd (gamma da - k0 - xh k1)
template <typename S>
inline void dz_row(const S* __restrict z, const S* __restrict da, S* __restrict o, int64_t n,
                   S mean, S rstd, S ga, S k0, S k1) {
  for (int64_t j = 0; j < n; ++j) {
    const S xh = (z[j] - mean) * rstd;
    o[j] = rstd * (ga * da[j] - k0 - xh * k1);
  }
}

// R-forward: rh = act'(a) (gamma rxh + ug xh + ub), rxh = (rz - rmean - xh q) rstd (rz = 0 if null)
template <typename S, bool RZ>
inline void rfwd_row(const S* __restrict z, const S* __restrict rz, S* __restrict rh, int64_t n,
                     S mean, S rstd, S ga, S be, S rmean, S q, S ug, S ub, S slope) {
  for (int64_t j = 0; j < n; ++j) {
    const S xh = (z[j] - mean) * rstd;
    const S a = ga * xh + be;
    const S rzj = RZ ? rz[j] : S(0);
    const S rxh = (rzj - rmean - xh * q) * rstd;
    const S ra = ga * rxh + ug * xh + ub;
    rh[j] = ra * (a > S(0) ? S(1) : slope);
  }
}

// R-backward sums: a1 += da, a2 += da xh, a3 += rda, a4 += rda xh, a5 += da rxh
template <typename S, bool RZ>
inline void rbwd_sums_row(const S* __restrict z, const S* __restrict rz, const S* __restrict da,
                          const S* __restrict rda, int64_t n, S mean, S rstd, S rmean, S q,
                          double* __restrict acc_io /* [5][kLanes] */) {
  double a[5][kLanes];
  for (int k = 0; k < 5; ++k)
    for (int l = 0; l < kLanes; ++l) a[k][l] = acc_io[k * kLanes + l];
  auto body = [&](int64_t j, int l) {
    const S xhs = (z[j] - mean) * rstd;
    const S rzj = RZ ? rz[j] : S(0);
    const S rxhs = (rzj - rmean - xhs * q) * rstd;
    const double xh = static_cast<double>(xhs), rxh = static_cast<double>(rxhs);
    const double d = static_cast<double>(da[j]), rd = static_cast<double>(rda[j]);
    a[0][l] += d;
    a[1][l] += d * xh;
    a[2][l] += rd;
    a[3][l] += rd * xh;
    a[4][l] += d * rxh;
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) body(j + l, l);
  for (int l = 0; j < n; ++j, ++l) body(j, l);
  for (int k = 0; k < 5; ++k)
    for (int l = 0; l < kLanes; ++l) acc_io[k * kLanes + l] = a[k][l];
}

// R-backward output: rdz = rstd (rdxh - k2 - rxh k1 - xh k3) - q rstd dz
template <typename S, bool RZ>
inline void rdz_row(const S* __restrict z, const S* __restrict rz, const S* __restrict da,
                    const S* __restrict rda, S* __restrict o, int64_t n, S mean, S rstd, S rmean,
                    S q, S ga, S ug, S k0, S k1, S k2, S k3, S qr) {
  for (int64_t j = 0; j < n; ++j) {
    const S xh = (z[j] - mean) * rstd;
    const S rzj = RZ ? rz[j] : S(0);
    const S rxh = (rzj - rmean - xh * q) * rstd;
    const S dz = rstd * (ga * da[j] - k0 - xh * k1);
    const S rdxh = ga * rda[j] + ug * da[j];
    o[j] = rstd * (rdxh - k2 - rxh * k1 - xh * k3) - qr * dz;
  }
}

// Per-(t, c) work items over [0, T*C); each runs fn(t, c, scratch).
template <typename F>
void for_each_channel(const Geo& g, int64_t scratch_bytes, F fn) {
  const int64_t items = g.T * g.C;
  // Grain: enough elements per range to amortize the parallel region; the decomposition into
  // (t, c) items (what each result depends on) does not change with it.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.M));
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    std::vector<unsigned char> scratch(static_cast<size_t>(scratch_bytes) + 64);
    for (int64_t i = i0; i < i1; ++i) fn(i / g.C, i % g.C, scratch.data());
  });
}

// ----------------------------------------- forward -----------------------------------------

template <typename S>
void bn_forward_kernel(const Geo& g, const S* z, const S* gamma, const S* beta, double eps,
                       S slope, S* out, S* mean_o, S* rstd_o, uint8_t* idx) {
  for_each_channel(g, g.HW * sizeof(S), [=, &g](int64_t t, int64_t c, unsigned char* scr) {
    S* h = reinterpret_cast<S*>(scr);
    const int64_t tc = t * g.C + c, HW = g.HW, N = g.N;
    const bool pool = g.pool != 0;
    double acc[kLanes] = {0};
    for (int64_t n = 0; n < N; ++n) sum_row(z + g.in(t, n, c), HW, acc);
    const double md = lanes_sum(acc) / static_cast<double>(g.M);
    double acc2[kLanes] = {0};
    for (int64_t n = 0; n < N; ++n) sqdev_row(z + g.in(t, n, c), HW, md, acc2);
    const S var = static_cast<S>(lanes_sum(acc2) / static_cast<double>(g.M));
    const S mean = static_cast<S>(md);
    const S rstd = static_cast<S>(1.0 / std::sqrt(static_cast<double>(var + static_cast<S>(eps))));
    mean_o[tc] = mean;
    rstd_o[tc] = rstd;
    const S ga = gamma[tc], be = beta[tc];
    for (int64_t n = 0; n < N; ++n) {
      if (pool) {
        fwd_row(z + g.in(t, n, c), h, HW, mean, rstd, ga, be, slope);
        maxpool_slice(h, out + g.out(t, n, c), idx + g.out(t, n, c), g);
      } else {
        fwd_row(z + g.in(t, n, c), out + g.out(t, n, c), HW, mean, rstd, ga, be, slope);
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_pool_forward_cpu(const Tensor& z_,
                                                                   const Tensor& gamma_,
                                                                   const Tensor& beta_, double eps,
                                                                   double slope, int64_t pool) {
  const char* op = "bn_act_pool_forward";
  const Geo g = make_geo(op, z_, pool);
  const Tensor z = z_.contiguous();
  const Tensor gamma = chan(op, "gamma", gamma_, z, g), beta = chan(op, "beta", beta_, z, g);
  Tensor out = at::empty(out_shape(g), z.options());
  Tensor mean = at::empty({g.T, g.C}, z.options()), rstd = at::empty({g.T, g.C}, z.options());
  Tensor idx = at::empty(pool ? at::IntArrayRef(out_shape(g)) : at::IntArrayRef({0}),
                         z.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmaml_bn_act_pool_forward", [&] {
    bn_forward_kernel<scalar_t>(g, z.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
                                beta.const_data_ptr<scalar_t>(), eps, static_cast<scalar_t>(slope),
                                out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<scalar_t>(),
                                rstd.mutable_data_ptr<scalar_t>(),
                                pool ? idx.mutable_data_ptr<uint8_t>() : nullptr);
  });
  return {out, mean, rstd, idx};
}

// da for one slice (length HW): scatter the pooled gradient into `dh` first when pooling.
template <typename S>
inline void da_slice(const Geo& g, const S* zp, const S* dop, const uint8_t* kp, S mean, S rstd,
                     S ga, S be, S slope, S* dh, S* da) {
  const S* d = dop;
  if (g.pool) {
    scatter_slice(dop, kp, dh, g);
    d = dh;
  }
  da_row(zp, d, da, g.HW, mean, rstd, ga, be, slope);
}

// ----------------------------------------- backward -----------------------------------------

template <typename S>
void bn_backward_kernel(const Geo& g, const S* dout, const S* z, const S* mean_, const S* rstd_,
                        const S* gamma, const S* beta, const uint8_t* idx, S slope, S* dz,
                        S* dgamma, S* dbeta) {
  // scratch: dh (HW) then da for the whole item (M)
  for_each_channel(g, (g.HW + g.M) * sizeof(S), [=, &g](int64_t t, int64_t c, unsigned char* scr) {
    S* dh = reinterpret_cast<S*>(scr);
    S* dabuf = dh + g.HW;
    const int64_t tc = t * g.C + c, HW = g.HW, N = g.N;
    const S mean = mean_[tc], rstd = rstd_[tc], ga = gamma[tc], be = beta[tc];
    double a1[kLanes] = {0}, a2[kLanes] = {0};
    for (int64_t n = 0; n < N; ++n) {
      const S* zp = z + g.in(t, n, c);
      S* da = dabuf + n * HW;
      da_slice<S>(g, zp, dout + g.out(t, n, c), g.pool ? idx + g.out(t, n, c) : nullptr, mean,
                  rstd, ga, be, slope, dh, da);
      sum2_row(zp, da, HW, mean, rstd, a1, a2);
    }
    const double sdb = lanes_sum(a1), sdg = lanes_sum(a2);
    dgamma[tc] = static_cast<S>(sdg);
    dbeta[tc] = static_cast<S>(sdb);
    const double Minv = 1.0 / static_cast<double>(g.M);
    // dz = rstd (gamma da - gamma dbeta / M - xh gamma dgamma / M)
    const S k0 = static_cast<S>(static_cast<double>(ga) * sdb * Minv);
    const S k1 = static_cast<S>(static_cast<double>(ga) * sdg * Minv);
    for (int64_t n = 0; n < N; ++n)
      dz_row(z + g.in(t, n, c), dabuf + n * HW, dz + g.in(t, n, c), HW, mean, rstd, ga, k0, k1);
  });
}

std::tuple<Tensor, Tensor, Tensor> bn_act_pool_backward_cpu(
    const Tensor& dout_, const Tensor& z_, const Tensor& mean_, const Tensor& rstd_,
    const Tensor& gamma_, const Tensor& beta_, const OptT& idx_, double slope, int64_t pool) {
  const char* op = "bn_act_pool_backward";
  const Geo g = make_geo(op, z_, pool);
  const Tensor z = z_.contiguous();
  const Tensor dout = act_like(op, "dout", dout_, z, out_shape(g));
  const Tensor mean = chan(op, "mean", mean_, z, g), rstd = chan(op, "rstd", rstd_, z, g);
  const Tensor gamma = chan(op, "gamma", gamma_, z, g), beta = chan(op, "beta", beta_, z, g);
  const Tensor idx = check_idx(op, idx_, g);
  Tensor dz = at::empty(z.sizes(), z.options());
  Tensor dgamma = at::empty({g.T, g.C}, z.options()), dbeta = at::empty({g.T, g.C}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmaml_bn_act_pool_backward", [&] {
    bn_backward_kernel<scalar_t>(
        g, dout.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<scalar_t>(), rstd.const_data_ptr<scalar_t>(),
        gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
        pool ? idx.const_data_ptr<uint8_t>() : nullptr, static_cast<scalar_t>(slope),
        dz.mutable_data_ptr<scalar_t>(), dgamma.mutable_data_ptr<scalar_t>(),
        dbeta.mutable_data_ptr<scalar_t>());
  });
  return {dz, dgamma, dbeta};
}

// ----------------------------------------- R-forward -----------------------------------------

template <typename S>
void bn_rforward_kernel(const Geo& g, const S* rz, const S* z, const S* mean_, const S* rstd_,
                        const S* gamma, const S* beta, const S* ugamma, const S* ubeta,
                        const uint8_t* idx, S slope, S* rout, S* rmean_o, S* q_o) {
  for_each_channel(g, g.HW * sizeof(S), [=, &g](int64_t t, int64_t c, unsigned char* scr) {
    S* rh = reinterpret_cast<S*>(scr);
    const int64_t tc = t * g.C + c, HW = g.HW, N = g.N;
    const S mean = mean_[tc], rstd = rstd_[tc], ga = gamma[tc], be = beta[tc];
    // pass 1: rmean = mean rz, q = mean(xh rz)
    double a1[kLanes] = {0}, a2[kLanes] = {0};
    if (rz != nullptr)
      for (int64_t n = 0; n < N; ++n) sum2_row(z + g.in(t, n, c), rz + g.in(t, n, c), HW, mean, rstd, a1, a2);
    const double Minv = 1.0 / static_cast<double>(g.M);
    const S rmean = static_cast<S>(lanes_sum(a1) * Minv);
    const S q = static_cast<S>(lanes_sum(a2) * Minv);
    rmean_o[tc] = rmean;
    q_o[tc] = q;
    const S ug = ugamma ? ugamma[tc] : S(0), ub = ubeta ? ubeta[tc] : S(0);
    // pass 2: rxh = (rz - rmean - xh q) rstd, ra = gamma rxh + ug xh + ub, rh = act' ra, gather
    for (int64_t n = 0; n < N; ++n) {
      const S* zp = z + g.in(t, n, c);
      S* dst = g.pool ? rh : rout + g.out(t, n, c);
      if (rz != nullptr)
        rfwd_row<S, true>(zp, rz + g.in(t, n, c), dst, HW, mean, rstd, ga, be, rmean, q, ug, ub, slope);
      else
        rfwd_row<S, false>(zp, nullptr, dst, HW, mean, rstd, ga, be, rmean, q, ug, ub, slope);
      if (g.pool) gather_slice(rh, idx + g.out(t, n, c), rout + g.out(t, n, c), g);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> bn_act_pool_rforward_cpu(
    const OptT& rz_, const Tensor& z_, const Tensor& mean_, const Tensor& rstd_,
    const Tensor& gamma_, const Tensor& beta_, const OptT& ugamma_, const OptT& ubeta_,
    const OptT& idx_, double slope, int64_t pool) {
  const char* op = "bn_act_pool_rforward";
  const Geo g = make_geo(op, z_, pool);
  const Tensor z = z_.contiguous();
  const Tensor rz = has(rz_) ? act_like(op, "rz", *rz_, z, z.sizes()) : Tensor();
  const Tensor mean = chan(op, "mean", mean_, z, g), rstd = chan(op, "rstd", rstd_, z, g);
  const Tensor gamma = chan(op, "gamma", gamma_, z, g), beta = chan(op, "beta", beta_, z, g);
  const Tensor ug = has(ugamma_) ? chan(op, "ugamma", *ugamma_, z, g) : Tensor();
  const Tensor ub = has(ubeta_) ? chan(op, "ubeta", *ubeta_, z, g) : Tensor();
  const Tensor idx = check_idx(op, idx_, g);
  Tensor rout = at::empty(out_shape(g), z.options());
  Tensor rmean = at::empty({g.T, g.C}, z.options()), q = at::empty({g.T, g.C}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmaml_bn_act_pool_rforward", [&] {
    bn_rforward_kernel<scalar_t>(
        g, rz.defined() ? rz.const_data_ptr<scalar_t>() : nullptr, z.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<scalar_t>(), rstd.const_data_ptr<scalar_t>(),
        gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
        ug.defined() ? ug.const_data_ptr<scalar_t>() : nullptr,
        ub.defined() ? ub.const_data_ptr<scalar_t>() : nullptr,
        pool ? idx.const_data_ptr<uint8_t>() : nullptr, static_cast<scalar_t>(slope),
        rout.mutable_data_ptr<scalar_t>(), rmean.mutable_data_ptr<scalar_t>(),
        q.mutable_data_ptr<scalar_t>());
  });
  return {rout, rmean, q};
}

// ----------------------------------------- R-backward -----------------------------------------

template <typename S>
void bn_rbackward_kernel(const Geo& g, const S* dout, const S* rdout, const S* z, const S* rz,
                         const S* mean_, const S* rstd_, const S* rmean_, const S* q_,
                         const S* gamma, const S* beta, const S* ugamma, const uint8_t* idx,
                         S slope, S* rdz, S* rdgamma, S* rdbeta) {
  // scratch: dh (HW), da (M), rda (M)
  for_each_channel(g, (g.HW + 2 * g.M) * sizeof(S), [=, &g](int64_t t, int64_t c,
                                                            unsigned char* scr) {
    S* dh = reinterpret_cast<S*>(scr);
    S* dabuf = dh + g.HW;
    S* rdabuf = dabuf + g.M;
    const int64_t tc = t * g.C + c, HW = g.HW, N = g.N;
    const S mean = mean_[tc], rstd = rstd_[tc], ga = gamma[tc], be = beta[tc];
    const S rmean = rmean_[tc], q = q_[tc];
    const S ug = ugamma ? ugamma[tc] : S(0);
    // pass 1: da, rda and the sums S1 = sum da, S2 = sum da xh, S3 = sum rda, S4 = sum rda xh,
    // S5 = sum da rxh
    double acc[5 * kLanes] = {0};
    for (int64_t n = 0; n < N; ++n) {
      const S* zp = z + g.in(t, n, c);
      const uint8_t* kp = g.pool ? idx + g.out(t, n, c) : nullptr;
      S* da = dabuf + n * HW;
      S* rda = rdabuf + n * HW;
      da_slice<S>(g, zp, dout + g.out(t, n, c), kp, mean, rstd, ga, be, slope, dh, da);
      if (rdout != nullptr)
        da_slice<S>(g, zp, rdout + g.out(t, n, c), kp, mean, rstd, ga, be, slope, dh, rda);
      else
        std::fill(rda, rda + HW, S(0));
      if (rz != nullptr)
        rbwd_sums_row<S, true>(zp, rz + g.in(t, n, c), da, rda, HW, mean, rstd, rmean, q, acc);
      else
        rbwd_sums_row<S, false>(zp, nullptr, da, rda, HW, mean, rstd, rmean, q, acc);
    }
    const double s1 = lanes_sum(acc), s2 = lanes_sum(acc + kLanes), s3 = lanes_sum(acc + 2 * kLanes),
                 s4 = lanes_sum(acc + 3 * kLanes), s5 = lanes_sum(acc + 4 * kLanes);
    rdgamma[tc] = static_cast<S>(s4 + s5);
    rdbeta[tc] = static_cast<S>(s3);
    const double Minv = 1.0 / static_cast<double>(g.M);
    const double gad = static_cast<double>(ga), ugd = static_cast<double>(ug);
    // dz = rstd (gamma da - k0 - xh k1); rdxh = gamma rda + ug da;
    // rdz = -q rstd dz + rstd (rdxh - k2 - rxh k1 - xh k3)
    const S k0 = static_cast<S>(gad * s1 * Minv);
    const S k1 = static_cast<S>(gad * s2 * Minv);
    const S k2 = static_cast<S>((gad * s3 + ugd * s1) * Minv);
    const S k3 = static_cast<S>((gad * s4 + ugd * s2 + gad * s5) * Minv);
    const S qr = q * rstd;
    for (int64_t n = 0; n < N; ++n) {
      const S* zp = z + g.in(t, n, c);
      if (rz != nullptr)
        rdz_row<S, true>(zp, rz + g.in(t, n, c), dabuf + n * HW, rdabuf + n * HW, rdz + g.in(t, n, c), HW,
                         mean, rstd, rmean, q, ga, ug, k0, k1, k2, k3, qr);
      else
        rdz_row<S, false>(zp, nullptr, dabuf + n * HW, rdabuf + n * HW, rdz + g.in(t, n, c), HW, mean,
                          rstd, rmean, q, ga, ug, k0, k1, k2, k3, qr);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> bn_act_pool_rbackward_cpu(
    const Tensor& dout_, const OptT& rdout_, const Tensor& z_, const OptT& rz_,
    const Tensor& mean_, const Tensor& rstd_, const Tensor& rmean_, const Tensor& q_,
    const Tensor& gamma_, const Tensor& beta_, const OptT& ugamma_, const OptT& idx_,
    double slope, int64_t pool) {
  const char* op = "bn_act_pool_rbackward";
  const Geo g = make_geo(op, z_, pool);
  const Tensor z = z_.contiguous();
  const Tensor dout = act_like(op, "dout", dout_, z, out_shape(g));
  const Tensor rdout = has(rdout_) ? act_like(op, "rdout", *rdout_, z, out_shape(g)) : Tensor();
  const Tensor rz = has(rz_) ? act_like(op, "rz", *rz_, z, z.sizes()) : Tensor();
  const Tensor mean = chan(op, "mean", mean_, z, g), rstd = chan(op, "rstd", rstd_, z, g);
  const Tensor rmean = chan(op, "rmean", rmean_, z, g), q = chan(op, "q", q_, z, g);
  const Tensor gamma = chan(op, "gamma", gamma_, z, g), beta = chan(op, "beta", beta_, z, g);
  const Tensor ug = has(ugamma_) ? chan(op, "ugamma", *ugamma_, z, g) : Tensor();
  const Tensor idx = check_idx(op, idx_, g);
  Tensor rdz = at::empty(z.sizes(), z.options());
  Tensor rdgamma = at::empty({g.T, g.C}, z.options()), rdbeta = at::empty({g.T, g.C}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmaml_bn_act_pool_rbackward", [&] {
    bn_rbackward_kernel<scalar_t>(
        g, dout.const_data_ptr<scalar_t>(),
        rdout.defined() ? rdout.const_data_ptr<scalar_t>() : nullptr, z.const_data_ptr<scalar_t>(),
        rz.defined() ? rz.const_data_ptr<scalar_t>() : nullptr, mean.const_data_ptr<scalar_t>(),
        rstd.const_data_ptr<scalar_t>(), rmean.const_data_ptr<scalar_t>(),
        q.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
        beta.const_data_ptr<scalar_t>(), ug.defined() ? ug.const_data_ptr<scalar_t>() : nullptr,
        pool ? idx.const_data_ptr<uint8_t>() : nullptr, static_cast<scalar_t>(slope),
        rdz.mutable_data_ptr<scalar_t>(), rdgamma.mutable_data_ptr<scalar_t>(),
        rdbeta.mutable_data_ptr<scalar_t>());
  });
  return {rdz, rdgamma, rdbeta};
}

}  // namespace
}  // namespace layers
}  // namespace fastmaml

// Optional outputs (a gradient not asked for, the pool indices without a pool) are returned as
// empty [0] tensors; fastmaml/layers/cpp.py maps them to None.
TORCH_LIBRARY_FRAGMENT(fastmaml, m) {
  m.def("conv2d_tasks(Tensor x, Tensor w, Tensor? b, int stride, int padding) -> Tensor");
  m.def(
      "conv2d_tasks_backward(Tensor dy, Tensor x, Tensor w, int stride, int padding, bool need_dx, "
      "bool need_dw, bool need_bias) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_pool_forward(Tensor z, Tensor gamma, Tensor beta, float eps, float slope, int pool) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_pool_backward(Tensor dout, Tensor z, Tensor mean, Tensor rstd, Tensor gamma, "
      "Tensor beta, Tensor? idx, float slope, int pool) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_pool_rforward(Tensor? rz, Tensor z, Tensor mean, Tensor rstd, Tensor gamma, "
      "Tensor beta, Tensor? ugamma, Tensor? ubeta, Tensor? idx, float slope, int pool) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_pool_rbackward(Tensor dout, Tensor? rdout, Tensor z, Tensor? rz, Tensor mean, "
      "Tensor rstd, Tensor rmean, Tensor q, Tensor gamma, Tensor beta, Tensor? ugamma, "
      "Tensor? idx, float slope, int pool) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("conv2d_tasks", &fastmaml::layers::conv2d_tasks_cpu);
  m.impl("conv2d_tasks_backward", &fastmaml::layers::conv2d_tasks_backward_cpu);
  m.impl("bn_act_pool_forward", &fastmaml::layers::bn_act_pool_forward_cpu);
  m.impl("bn_act_pool_backward", &fastmaml::layers::bn_act_pool_backward_cpu);
  m.impl("bn_act_pool_rforward", &fastmaml::layers::bn_act_pool_rforward_cpu);
  m.impl("bn_act_pool_rbackward", &fastmaml::layers::bn_act_pool_rbackward_cpu);
}

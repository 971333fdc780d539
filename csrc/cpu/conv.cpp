// Family: convolution, task-batched on the CPU (docs/design.md, the convolution layer):
//   conv2d_tasks           y[t] = conv2d(x[t], w[t]) + b[t]      x [T, N, C, H, W], w [T, O, C, kh, kw],
//                                                                b [T, O] or None -> y [T, N, O, Ho, Wo]
//   conv2d_tasks_backward  dx [T, N, C, H, W], dw [T, O, C, kh, kw], db [T, O] (each only if asked;
//                          an empty [0] tensor otherwise)
// with Ho = (H + 2 padding - kh) / stride + 1 (and Wo alike). The semantics are exactly those of
// fastmaml/layers/torch_kernels.py; fastmaml/layers/cpp.py wraps these ops with the reference's Python
// signatures.
//
// Convolutions: at::parallel_for over tasks (grain 1), each task's convolution run by ATen
// (oneDNN / MKL GEMMs) single-threaded inside the parallel region and written into a preallocated
// [T, ...] output. Small convolutions scale far better across tasks than inside one batch.

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <optional>
#include <tuple>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "layer_common.h"

// Our loops only (after the includes): without no-trapping-math GCC keeps `a > 0 ? ...` as control
// flow (a compare may trap) and vectorizes none of the elementwise loops. It changes no result: no
// reassociation, only the assumption that floating-point exceptions are not trapped. No contraction
// of a * b + c into an FMA either (GCC contracts by default where the target has FMAs, as the
// AVX-512 build does): every product and sum is rounded as the reference rounds it, and both builds
// compute the same bits.
#pragma GCC optimize("no-trapping-math", "fp-contract=off")

namespace fastmaml {
namespace layers {
namespace {

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

}  // namespace
}  // namespace layers
}  // namespace fastmaml

// Optional outputs (a gradient not asked for) are returned as empty [0] tensors.
TORCH_LIBRARY_FRAGMENT(fastmaml, m) {
  m.def("conv2d_tasks(Tensor x, Tensor w, Tensor? b, int stride, int padding) -> Tensor");
  m.def(
      "conv2d_tasks_backward(Tensor dy, Tensor x, Tensor w, int stride, int padding, bool need_dx, "
      "bool need_dw, bool need_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("conv2d_tasks", &fastmaml::layers::conv2d_tasks_cpu);
  m.impl("conv2d_tasks_backward", &fastmaml::layers::conv2d_tasks_backward_cpu);
}

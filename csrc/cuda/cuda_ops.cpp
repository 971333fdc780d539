// Family: the flat-layout ops (inner_update, scale, segment_dot, reverse_step) on CUDA: the torch
// host wrapper. Same math and shapes as their CPU kernels (csrc/cpu/flat_ops.cpp; [T, P] rows of
// fast weights, a rate a[p] scalar / per segment / per element; docs/design.md). It checks the
// tensors (csrc/cpu/flat_checks.h), allocates the outputs and the reduction workspace (torch's
// caching allocator), and calls the plain-CUDA launchers of csrc/cuda/fused_ops.cuh on the current
// stream. Compiled only in a CUDA build of torch (setup.py defines FASTMAML_WITH_CUDA); the op
// schemas come from csrc/cpu/flat_ops.cpp.
//
// Segment ids are NOT range-checked here: that would need a device->host sync on every call. The
// Python layer validates them; the kernels never read out of bounds on a bad id (see the header).

#ifdef FASTMAML_WITH_CUDA

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "../cpu/flat_checks.h"  // the argument checks, shared with the CPU kernels
#include "fused_ops.cuh"

namespace fastmaml {

namespace cuda_impl {
namespace {

namespace k = ::fastmaml::cuda;

// at:: scalar types -> the CUDA types of the launchers (same size and bit layout).
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

static_assert(sizeof(at::Half) == sizeof(__half), "at::Half and __half differ in size");
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16),
              "at::BFloat16 and __nv_bfloat16 differ in size");

template <typename scalar_t>
using cuda_t = typename CudaType<scalar_t>::type;

template <typename scalar_t>
const cuda_t<scalar_t>* in_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const cuda_t<scalar_t>*>(t.const_data_ptr<scalar_t>())
                     : nullptr;
}
template <typename scalar_t>
cuda_t<scalar_t>* out_ptr(at::Tensor& t) {
  return reinterpret_cast<cuda_t<scalar_t>*>(t.mutable_data_ptr<scalar_t>());
}

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "fastmaml::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fastmaml::", op, ": ", name,
              " must be float32, float64, float16 or bfloat16 on CUDA, got ", st);
}

k::LrMode to_mode(int64_t mode) { return static_cast<k::LrMode>(static_cast<int>(mode)); }

const int64_t* seg_ptr(int64_t mode, const std::optional<at::Tensor>& segments, at::Tensor& keep) {
  if (mode != k::kLrSegment) return nullptr;
  keep = segments->contiguous();
  return keep.const_data_ptr<int64_t>();
}

// Reduction workspace: float accumulators (double for double data).
at::Tensor workspace_for(const at::Tensor& data, int64_t n) {
  const auto acc = data.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({n}, data.options().dtype(acc));
}

at::Tensor inner_update_cuda(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                             const std::optional<at::Tensor>& segments) {
  const char* op = "inner_update";
  detail::check_operand(op, "theta", theta, theta, "theta");
  check_cuda(op, "theta", theta);
  detail::check_operand(op, "grad", grad, theta, "theta");
  int64_t T = 0, P = 0, num_lr = 0;
  detail::check_inner_update_shapes(theta, grad, &T, &P);
  const int64_t mode = detail::check_lr(op, theta, "theta", lr, segments, P, &num_lr);

  const c10::cuda::CUDAGuard device_guard(theta.device());
  const at::Tensor th = theta.contiguous();
  const at::Tensor gr = grad.contiguous();
  const at::Tensor lr_c = lr.contiguous();
  at::Tensor seg_keep;
  const int64_t* seg = seg_ptr(mode, segments, seg_keep);
  at::Tensor out = (theta.dim() == 2 || grad.dim() == 2) ? at::empty({T, P}, theta.options())
                                                          : at::empty({P}, theta.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(),
                                  "fastmaml_inner_update_cuda", [&] {
    C10_CUDA_CHECK(k::launch_inner_update(out_ptr<scalar_t>(out), in_ptr<scalar_t>(th),
                                          in_ptr<scalar_t>(gr), T, P, theta.dim() == 2,
                                          grad.dim() == 2, in_ptr<scalar_t>(lr_c), seg, num_lr,
                                          to_mode(mode), stream));
  });
  return out;
}

at::Tensor scale_cuda(const at::Tensor& v, const at::Tensor& lr,
                      const std::optional<at::Tensor>& segments) {
  const char* op = "scale";
  detail::check_operand(op, "v", v, v, "v");
  check_cuda(op, "v", v);
  const int64_t P = v.size(-1);
  const int64_t T = v.dim() == 2 ? v.size(0) : 1;
  int64_t num_lr = 0;
  const int64_t mode = detail::check_lr(op, v, "v", lr, segments, P, &num_lr);

  const c10::cuda::CUDAGuard device_guard(v.device());
  const at::Tensor vc = v.contiguous();
  const at::Tensor lr_c = lr.contiguous();
  at::Tensor seg_keep;
  const int64_t* seg = seg_ptr(mode, segments, seg_keep);
  at::Tensor out = at::empty(v.sizes(), v.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "fastmaml_scale_cuda",
                                  [&] {
    C10_CUDA_CHECK(k::launch_scale(out_ptr<scalar_t>(out), in_ptr<scalar_t>(vc), T, P,
                                   in_ptr<scalar_t>(lr_c), seg, num_lr, to_mode(mode), stream));
  });
  return out;
}

at::Tensor segment_dot_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& lr,
                            const std::optional<at::Tensor>& segments) {
  const char* op = "segment_dot";
  detail::check_operand(op, "a", a, a, "a");
  check_cuda(op, "a", a);
  detail::check_operand(op, "b", b, a, "a");
  detail::check_same_shape(op, "b", b, a, "a");
  const int64_t P = a.size(-1);
  const int64_t T = a.dim() == 2 ? a.size(0) : 1;
  int64_t num_lr = 0;
  const int64_t mode = detail::check_lr(op, a, "a", lr, segments, P, &num_lr);

  const c10::cuda::CUDAGuard device_guard(a.device());
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  at::Tensor seg_keep;
  const int64_t* seg = seg_ptr(mode, segments, seg_keep);
  at::Tensor out = at::empty(lr.sizes(), lr.options());
  at::Tensor ws = workspace_for(a, num_lr);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(),
                                  "fastmaml_segment_dot_cuda", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    C10_CUDA_CHECK(k::launch_segment_dot(out_ptr<scalar_t>(out), in_ptr<scalar_t>(ac),
                                         in_ptr<scalar_t>(bc), T, P, seg, num_lr, to_mode(mode),
                                         ws.mutable_data_ptr<acc>(), stream));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> reverse_step_cuda(const at::Tensor& v,
                                                     const std::optional<at::Tensor>& hv,
                                                     const at::Tensor& g,
                                                     const std::optional<at::Tensor>& gq, double w,
                                                     const at::Tensor& lr,
                                                     const std::optional<at::Tensor>& segments) {
  const char* op = "reverse_step";
  detail::check_operand(op, "v", v, v, "v");
  check_cuda(op, "v", v);
  const bool has_hv = hv.has_value() && hv->defined();
  // Like the reference: the gq term is dropped when gq is None or w == 0.
  const bool has_gq = gq.has_value() && gq->defined() && w != 0.0;
  if (has_hv) {
    detail::check_operand(op, "hv", *hv, v, "v");
    detail::check_same_shape(op, "hv", *hv, v, "v");
  }
  detail::check_operand(op, "g", g, v, "v");
  detail::check_same_shape(op, "g", g, v, "v");
  if (gq.has_value() && gq->defined()) {
    detail::check_operand(op, "gq", *gq, v, "v");
    detail::check_same_shape(op, "gq", *gq, v, "v");
  }
  const int64_t P = v.size(-1);
  const int64_t T = v.dim() == 2 ? v.size(0) : 1;
  int64_t num_lr = 0;
  const int64_t mode = detail::check_lr(op, v, "v", lr, segments, P, &num_lr);

  const c10::cuda::CUDAGuard device_guard(v.device());
  const at::Tensor vc = v.contiguous();
  const at::Tensor gc = g.contiguous();
  const at::Tensor hvc = has_hv ? hv->contiguous() : at::Tensor();
  const at::Tensor gqc = has_gq ? gq->contiguous() : at::Tensor();
  at::Tensor seg_keep;
  const int64_t* seg = seg_ptr(mode, segments, seg_keep);
  at::Tensor out = at::empty(v.sizes(), v.options());
  at::Tensor d_lr = at::empty(lr.sizes(), lr.options());
  at::Tensor ws = workspace_for(v, num_lr);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                  "fastmaml_reverse_step_cuda", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    C10_CUDA_CHECK(k::launch_reverse_step(out_ptr<scalar_t>(out), out_ptr<scalar_t>(d_lr),
                                          in_ptr<scalar_t>(vc), in_ptr<scalar_t>(hvc),
                                          in_ptr<scalar_t>(gc), in_ptr<scalar_t>(gqc), w, T, P,
                                          seg, num_lr, to_mode(mode), ws.mutable_data_ptr<acc>(),
                                          stream));
  });
  return std::make_tuple(out, d_lr);
}

}  // namespace
}  // namespace cuda_impl
}  // namespace fastmaml

TORCH_LIBRARY_IMPL(fastmaml, CUDA, m) {
  m.impl("inner_update", &fastmaml::cuda_impl::inner_update_cuda);
  m.impl("scale", &fastmaml::cuda_impl::scale_cuda);
  m.impl("segment_dot", &fastmaml::cuda_impl::segment_dot_cuda);
  m.impl("reverse_step", &fastmaml::cuda_impl::reverse_step_cuda);
}

#endif  // FASTMAML_WITH_CUDA

// Family: the fused BatchNorm (per-task batch statistics) + activation (ReLU / LeakyReLU of slope
// `slope`) + optional 2x2 max-pool block on the CPU, in four passes (docs/design.md, the BatchNorm
// block; docs/design.md §4):
//   bn_act_pool_forward    z [T, N, C, H, W], gamma, beta [T, C] -> out [T, N, C, Ho, Wo],
//                          mean, rstd [T, C], idx uint8 [T, N, C, Ho, Wo] (pool = 2; else [0])
//                          out = maxpool(act(gamma (z - mean) rstd + beta))
//   bn_act_pool_backward   dout -> dz [T, N, C, H, W], dgamma, dbeta [T, C]
//   bn_act_pool_rforward   R{out}, R{mean} and q [T, C] (the R-operator of the forward along rz,
//                          ugamma, ubeta)
//   bn_act_pool_rbackward  R{dz}, R{dgamma}, R{dbeta} (the R-operator of the backward)
//   bn_kernels_isa         "avx512" or "base": the build the kernels run with now
// with Ho, Wo = H / 2, W / 2 when pool = 2 (an odd last row / column dropped), else H, W. The
// semantics are exactly those of fastmaml/layers/torch_kernels.py; fastmaml/layers/cpp.py wraps these
// ops with the reference's Python signatures (None for the optional outputs returned here as empty
// tensors).
//
// BatchNorm blocks (csrc/cpu/batchnorm_{pool,rows,passes}.inc): float and double; one work item per
// (task, channel), a FIXED decomposition (never derived from the thread count), each item computing
// its reductions in double in a fixed order with kLanes independent partial sums, so every result
// is bit-identical for any number of threads. Each item makes two passes over its N slices of H*W
// contiguous elements: the reductions (the forward: the mean, then the squared deviations), then
// the elementwise output; the backward passes compute the activation's gradient and its sums in one
// loop and keep it for the output loop. Elementwise values are computed in the input dtype in the
// reference's order (xh = (z - mean) * rstd, a = gamma * xh + beta) so that every pass sees the
// same activation mask; the max-pool indices are those of the forward (first maximum on ties, as
// torch's max picks it). The kernels are compiled twice, for the baseline target and for AVX-512
// (GCC on x86-64), and chosen at run time by the CPU's features: both give bit-identical results
// (FASTMAML_CPU_ISA=base forces the baseline, for tests and comparisons).

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <cstdlib>
#include <cstring>
#include <vector>

// The AVX-512 build of the BatchNorm kernels: GCC on x86-64 (#pragma GCC target, with runtime
// dispatch); elsewhere the baseline build only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASTMAML_NO_AVX512)
#define FASTMAML_AVX512_PATH 1
#include <immintrin.h>
#else
#define FASTMAML_AVX512_PATH 0
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

constexpr int kLanes = 8;  // independent partial sums per reduction (the compiler vectorizes them)

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

// ---- the BatchNorm kernels, built twice (csrc/cpu/batchnorm_{pool,rows,passes}.inc) ----

#define FM_AVX512 0
namespace isa_base {
#include "batchnorm_pool.inc"
#include "batchnorm_rows.inc"
#include "batchnorm_passes.inc"
}  // namespace isa_base
#undef FM_AVX512

#if FASTMAML_AVX512_PATH
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#define FM_AVX512 1
namespace isa_avx512 {
#include "batchnorm_pool.inc"
#include "batchnorm_rows.inc"
#include "batchnorm_passes.inc"
}  // namespace isa_avx512
#undef FM_AVX512
#pragma GCC pop_options
#else
namespace isa_avx512 = isa_base;
#endif

// The AVX-512 build when this CPU (and its OS) has AVX-512 F/BW/VL/DQ, unless FASTMAML_CPU_ISA=base.
bool use_avx512() {
#if FASTMAML_AVX512_PATH
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const char* isa = std::getenv("FASTMAML_CPU_ISA");
  return cpu && !(isa != nullptr && std::strcmp(isa, "base") == 0);
#else
  return false;
#endif
}

// The instruction set the BatchNorm kernels run with now: "avx512" or "base".
std::string bn_kernels_isa() { return use_avx512() ? "avx512" : "base"; }

// ----------------------------------------- forward -----------------------------------------

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
  const bool avx512 = use_avx512();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmaml_bn_act_pool_forward", [&] {
    (avx512 ? isa_avx512::bn_forward_kernel<scalar_t> : isa_base::bn_forward_kernel<scalar_t>)(
        g, z.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
        beta.const_data_ptr<scalar_t>(), eps, static_cast<scalar_t>(slope),
        out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<scalar_t>(),
        rstd.mutable_data_ptr<scalar_t>(), pool ? idx.mutable_data_ptr<uint8_t>() : nullptr);
  });
  return {out, mean, rstd, idx};
}

// ----------------------------------------- backward -----------------------------------------

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
  const bool avx512 = use_avx512();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmaml_bn_act_pool_backward", [&] {
    (avx512 ? isa_avx512::bn_backward_kernel<scalar_t> : isa_base::bn_backward_kernel<scalar_t>)(
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
  const bool avx512 = use_avx512();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmaml_bn_act_pool_rforward", [&] {
    (avx512 ? isa_avx512::bn_rforward_kernel<scalar_t> : isa_base::bn_rforward_kernel<scalar_t>)(
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
  const bool avx512 = use_avx512();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmaml_bn_act_pool_rbackward", [&] {
    (avx512 ? isa_avx512::bn_rbackward_kernel<scalar_t> : isa_base::bn_rbackward_kernel<scalar_t>)(
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

// Optional outputs (the pool indices without a pool) are returned as empty [0] tensors;
// fastmaml/layers/cpp.py maps them to None.
TORCH_LIBRARY_FRAGMENT(fastmaml, m) {
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
  m.def("bn_kernels_isa() -> str", &fastmaml::layers::bn_kernels_isa);
}

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("bn_act_pool_forward", &fastmaml::layers::bn_act_pool_forward_cpu);
  m.impl("bn_act_pool_backward", &fastmaml::layers::bn_act_pool_backward_cpu);
  m.impl("bn_act_pool_rforward", &fastmaml::layers::bn_act_pool_rforward_cpu);
  m.impl("bn_act_pool_rbackward", &fastmaml::layers::bn_act_pool_rbackward_cpu);
}

// Family: CG, the batched conjugate-gradient vector updates of implicit MAML (issue 14), CPU kernels;
// registers torch.ops.fastmaml_cg (schemas and CPU kernels). Math: docs/design.md (iMAML's solve).
//
// T linear systems (I + H_t / lambda) x_t = b_t, one per task, advance together as rows of [T, P]
// buffers. Each CG iteration's vector work is two passes over [T, P]:
//
//   cg_step(x, r, p, Ap, alpha)  -> (x + alpha[t] p, r - alpha[t] Ap, ||r_new[t]||^2)   one pass
//   cg_direction(r, p, beta)     -> r + beta[t] p                                        one pass
//
// alpha and beta are [T]; a task whose system has converged gets alpha = beta = 0 from the caller
// (its x and r stay fixed): the per-task convergence mask. The reference (the semantics) is
// fastmaml/kernels/cg_torch.py; the schemas are in fastmaml/kernels/cg.py.
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>

namespace fastmaml {
namespace cg {
namespace {

void check_rows(const char* op, const at::Tensor& like, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  TORCH_CHECK(like.dim() == 2, op, ": expected [T, P] tensors, got ", like.sizes());
  for (auto& [name, t] : ts) {
    TORCH_CHECK(t->sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                ", expected ", like.scalar_type());
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  }
}

void check_coef(const char* op, const char* name, const at::Tensor& c, const at::Tensor& like) {
  TORCH_CHECK(c.dim() == 1 && c.size(0) == like.size(0), op, ": ", name, " must be [T] = [", like.size(0),
              "], got ", c.sizes());
  TORCH_CHECK(c.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", c.scalar_type(), ", expected ",
              like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cg_step_cpu(const at::Tensor& x_, const at::Tensor& r_,
                                                           const at::Tensor& p_, const at::Tensor& ap_,
                                                           const at::Tensor& alpha_) {
  check_rows("fastmaml_cg::cg_step", x_, {{"x", &x_}, {"r", &r_}, {"p", &p_}, {"Ap", &ap_}});
  check_coef("fastmaml_cg::cg_step", "alpha", alpha_, x_);
  auto x = x_.contiguous(), r = r_.contiguous(), p = p_.contiguous(), ap = ap_.contiguous();
  auto alpha = alpha_.contiguous();
  const int64_t T = x.size(0), P = x.size(1);
  auto x_out = at::empty_like(x), r_out = at::empty_like(r), rs = at::empty({T}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *rp = r.data_ptr<scalar_t>(), *pp = p.data_ptr<scalar_t>(),
                   *app = ap.data_ptr<scalar_t>(), *al = alpha.data_ptr<scalar_t>();
    scalar_t *xo = x_out.data_ptr<scalar_t>(), *ro = r_out.data_ptr<scalar_t>(), *rso = rs.data_ptr<scalar_t>();
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t a = al[t];
        const int64_t o = t * P;
        acc_t s = 0;
        for (int64_t i = 0; i < P; ++i) {
          xo[o + i] = xp[o + i] + a * pp[o + i];
          const scalar_t rn = rp[o + i] - a * app[o + i];
          ro[o + i] = rn;
          s += static_cast<acc_t>(rn) * static_cast<acc_t>(rn);
        }
        rso[t] = static_cast<scalar_t>(s);
      }
    });
  });
  return {x_out, r_out, rs};
}

at::Tensor cg_direction_cpu(const at::Tensor& r_, const at::Tensor& p_, const at::Tensor& beta_) {
  check_rows("fastmaml_cg::cg_direction", r_, {{"r", &r_}, {"p", &p_}});
  check_coef("fastmaml_cg::cg_direction", "beta", beta_, r_);
  auto r = r_.contiguous(), p = p_.contiguous(), beta = beta_.contiguous();
  const int64_t T = r.size(0), P = r.size(1);
  auto out = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "cg_direction", [&] {
    const scalar_t *rp = r.data_ptr<scalar_t>(), *pp = p.data_ptr<scalar_t>(), *bp = beta.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T * P, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = rp[i] + bp[i / P] * pp[i];
    });
  });
  return out;
}

}  // namespace
}  // namespace cg
}  // namespace fastmaml

// Exactly the strings of fastmaml/kernels/cg.py's CG_SCHEMAS (a test compares them).
TORCH_LIBRARY(fastmaml_cg, m) {
  m.def("cg_step(Tensor x, Tensor r, Tensor p, Tensor Ap, Tensor alpha) -> (Tensor, Tensor, Tensor)");
  m.def("cg_direction(Tensor r, Tensor p, Tensor beta) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmaml_cg, CPU, m) {
  m.impl("cg_step", &fastmaml::cg::cg_step_cpu);
  m.impl("cg_direction", &fastmaml::cg::cg_direction_cpu);
}

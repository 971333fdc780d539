// Argument checks of the flat-layout ops (declared in csrc/cpu/flat_checks.h): dtypes, devices,
// [P] / [T, P] shapes and the learning-rate form. Shared by the CPU kernels (csrc/cpu/flat_ops.cpp)
// and the CUDA wrappers (csrc/cuda/cuda_ops.cpp). No arithmetic: they only validate and describe.

#include "flat_checks.h"

#include <sstream>
#include <string>

namespace fastmaml {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Argument checks (shared with csrc/cuda/cuda_ops.cpp)
// ---------------------------------------------------------------------------------------------

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) os << ", ";
    os << sizes[i];
  }
  os << "]";
  return os.str();
}

// `t` is defined, has the dtype and device of `ref` (named `ref_name`), and is [P] or [T, P].
void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                   const char* ref_name) {
  TORCH_CHECK(t.defined(), "fastmaml::", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastmaml::", op, ": ", name,
              " must have dtype ", ref.scalar_type(), " (the dtype of ", ref_name, "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fastmaml::", op, ": ", name, " must be on ",
              ref.device(), " (the device of ", ref_name, "), got ", t.device());
  TORCH_CHECK(t.dim() == 1 || t.dim() == 2, "fastmaml::", op, ": ", name,
              " must be 1-D [P] or 2-D [T, P], got shape ", shape_str(t.sizes()));
}

// `t` has exactly the shape of `ref`.
void check_same_shape(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastmaml::", op, ": ", name, " must have shape ",
              shape_str(ref.sizes()), " (matching ", ref_name, "), got ", shape_str(t.sizes()));
}

// inner_update: theta and grad are each [P] or [T, P]; returns {T, P, theta_per_task,
// grad_per_task} through the out-parameters. T = 1 when both are [P].
void check_inner_update_shapes(const at::Tensor& theta, const at::Tensor& grad, int64_t* T,
                               int64_t* P) {
  const int64_t p = theta.size(-1);
  const bool grad_ok = grad.size(-1) == p &&
                       (grad.dim() == 1 || theta.dim() == 1 || grad.size(0) == theta.size(0));
  if (!grad_ok) {
    const std::string tasks = theta.dim() == 2 ? std::to_string(theta.size(0)) : std::string("T");
    TORCH_CHECK(false, "fastmaml::inner_update: grad must have shape [", tasks, ", ", p, "] or [",
                p, "] (matching theta), got ", shape_str(grad.sizes()));
  }
  *P = p;
  *T = theta.dim() == 2 ? theta.size(0) : (grad.dim() == 2 ? grad.size(0) : 1);
}

// Learning-rate form. Checks lr (dtype/device of `data`) and segments; returns the mode
// (0 scalar, 1 per segment, 2 per element) and the number of lr entries (1, S or P) in *num_lr.
// Segment ids are NOT range-checked here (the CPU kernels check them while they scan the ids).
int64_t check_lr(const char* op, const at::Tensor& data, const char* data_name,
                 const at::Tensor& lr, const std::optional<at::Tensor>& segments, int64_t P,
                 int64_t* num_lr) {
  TORCH_CHECK(lr.defined(), "fastmaml::", op, ": lr is an undefined tensor");
  TORCH_CHECK(lr.scalar_type() == data.scalar_type(), "fastmaml::", op,
              ": lr must have dtype ", data.scalar_type(), " (the dtype of ", data_name, "), got ",
              lr.scalar_type());
  TORCH_CHECK(lr.device() == data.device(), "fastmaml::", op, ": lr must be on ", data.device(),
              " (the device of ", data_name, "), got ", lr.device());
  const bool has_seg = segments.has_value() && segments->defined();
  if (lr.dim() == 0) {
    *num_lr = 1;
    return 0;
  }
  TORCH_CHECK(lr.dim() == 1, "fastmaml::", op, ": lr must be 0-d (scalar), [S] (per segment, with ",
              "segments) or [", P, "] (per element, without segments), got shape ",
              shape_str(lr.sizes()));
  if (!has_seg) {
    TORCH_CHECK(lr.size(0) == P, "fastmaml::", op, ": lr of shape ", shape_str(lr.sizes()),
                " without segments is per element and must have shape [", P,
                "] (the last dimension of ", data_name, "); pass segments for a per-segment lr");
    *num_lr = P;
    return 2;
  }
  const at::Tensor& seg = *segments;
  TORCH_CHECK(seg.scalar_type() == at::kLong, "fastmaml::", op,
              ": segments must be an int64 tensor, got dtype ", seg.scalar_type());
  TORCH_CHECK(seg.device() == data.device(), "fastmaml::", op, ": segments must be on ",
              data.device(), " (the device of ", data_name, "), got ", seg.device());
  TORCH_CHECK(seg.dim() == 1 && seg.size(0) == P, "fastmaml::", op,
              ": segments must have shape [", P, "] (one id per element of ", data_name,
              "), got ", shape_str(seg.sizes()));
  TORCH_CHECK(lr.size(0) > 0 || P == 0, "fastmaml::", op,
              ": lr has 0 segments (shape [0]) but segments has ", P, " ids");
  *num_lr = lr.size(0);
  return 1;
}

}  // namespace detail
}  // namespace fastmaml

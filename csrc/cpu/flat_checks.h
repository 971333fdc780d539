// Argument checks of the flat-layout ops (inner_update, scale, segment_dot, reverse_step), shared
// by their CPU kernels (csrc/cpu/flat_ops.cpp) and their CUDA wrappers (csrc/cuda/cuda_ops.cpp);
// defined in csrc/cpu/flat_checks.cpp. Layout and learning-rate forms: csrc/cpu/flat_ops.cpp's
// header and docs/design.md (the flat [T, P] buffer).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

namespace fastmaml {
namespace detail {

// "[d0, d1, ...]" for error messages.
std::string shape_str(at::IntArrayRef sizes);

// `t` is defined, has the dtype and device of `ref` (named `ref_name`), and is [P] or [T, P].
void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                   const char* ref_name);

// `t` has exactly the shape of `ref`.
void check_same_shape(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                      const char* ref_name);

// inner_update: theta and grad are each [P] or [T, P]; *T and *P out (T = 1 when both are [P]).
void check_inner_update_shapes(const at::Tensor& theta, const at::Tensor& grad, int64_t* T,
                               int64_t* P);

// The learning-rate form: returns the mode (0 scalar, 1 per segment, 2 per element) and the number
// of lr entries (1, S or P) in *num_lr. Segment ids are not range-checked here.
int64_t check_lr(const char* op, const at::Tensor& data, const char* data_name,
                 const at::Tensor& lr, const std::optional<at::Tensor>& segments, int64_t P,
                 int64_t* num_lr);

}  // namespace detail
}  // namespace fastmaml

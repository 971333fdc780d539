// Helpers shared by the C++ layer families (csrc/cpu/conv.cpp, csrc/cpu/batchnorm.cpp): optional
// tensors and the empty [0] tensor an op returns for an output not asked for (fastmaml/layers/cpp.py
// maps it to None). In an anonymous namespace, as they were in each layer file: every unit gets
// its own internal copy.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastmaml {
namespace layers {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

inline bool has(const OptT& t) { return t.has_value() && t->defined(); }

inline Tensor empty0(const Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace
}  // namespace layers
}  // namespace fastmaml

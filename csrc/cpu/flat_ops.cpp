// Family: the flat-layout ops (inner_update, scale, segment_dot, reverse_step) on the CPU; this file
// holds TORCH_LIBRARY(fastmaml) (the namespace's one definition block: the flat ops' schemas; the
// layer families add theirs with TORCH_LIBRARY_FRAGMENT in csrc/cpu/conv.cpp and batchnorm.cpp).
//
// Layout (docs/design.md §3.1): the fast weights of T tasks live in one flat [T, P] buffer and
// the meta-parameters are [P]. A learning rate `lr` has three forms:
//   scalar       lr 0-d                          (segments, if given, is ignored)
//   per segment  lr [S] and segments int64 [P]   ids in [0, S)
//   per element  lr [P] and segments None
// and a[p] denotes lr / lr[segments[p]] / lr[p]. The semantics are those of
// fastmaml/kernels/flat_torch.py; the schema strings are those of fastmaml/kernels/schemas.py.
//
// CPU kernels: float and double, plain restrict-qualified loops that the compiler vectorizes, run
// with at::parallel_for over work items of FIXED size (kChunk columns; never derived from the
// thread count, so every result, reductions included, is bit-identical for any number of threads).
// Elementwise work and most reduction work go row-major over (task, column chunk) items, so each
// thread streams through contiguous memory. Reductions accumulate in double (several independent
// lanes per row), keep one partial sum per work item and segment run, and merge the partials in a
// fixed order (no atomics). Per-segment mode first scans the ids once per chunk into maximal runs
// of equal id (the segments of a parameter list are long contiguous runs), checking the range
// before anything is computed; a run is processed with a scalar a. A chunk of many short runs
// (arbitrary ids) is "fragmented": its a is gathered into a buffer (elementwise ops) or it is
// reduced column-wise (reductions). Per-element reductions (sum over tasks only) run column-wise.
//
// The argument checks (namespace fastmaml::detail) are in csrc/cpu/flat_checks.{h,cpp}, shared with
// the CUDA wrappers of csrc/cuda/cuda_ops.cpp.

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "flat_checks.h"

namespace fastmaml {

namespace cpu {
namespace {

using detail::check_lr;
using detail::check_operand;
using detail::check_same_shape;
using detail::shape_str;

enum : int64_t { kLrScalar = 0, kLrSegment = 1, kLrElement = 2 };

// Fixed column chunk: the unit of parallel work and of partial sums. Fixed (not derived from the
// thread count) so that reductions are deterministic.
constexpr int64_t kChunk = 2048;
// Column block of the per-element reductions (sum over tasks only), processed column-wise.
constexpr int64_t kColBlock = 8192;
// Work (elements) below which a parallel_for range is not split further.
constexpr int64_t kGrainElems = 32768;
// A per-segment chunk whose runs average fewer elements than this is "fragmented": a is gathered.
constexpr int64_t kMinRunLen = 16;
// Independent accumulators per row dot product (vectorizable, and better rounding).
constexpr int kLanes = 8;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Run {
  int64_t begin, end, id;
};

// Splits columns [c0, c1) into maximal runs of equal segment id, appended to `runs`. An id outside
// [0, S) is recorded in *bad (the first such column) and replaced by 0 so that nothing reads out
// of bounds. Requires S > 0.
inline void find_runs(const int64_t* seg, int64_t c0, int64_t c1, int64_t S,
                      std::vector<Run>& runs, int64_t* bad) {
  int64_t p = c0;
  while (p < c1) {
    int64_t id = seg[p];
    int64_t q = p + 1;
    while (q < c1 && seg[q] == id) ++q;
    if (id < 0 || id >= S) {
      if (*bad < 0) *bad = p;
      id = 0;
    }
    runs.push_back(Run{p, q, id});
    p = q;
  }
}

// The per-segment structure of the columns, per column chunk: its runs, and whether it is
// "fragmented" (runs shorter than kMinRunLen on average: arbitrary ids), in which case a is
// gathered (elementwise ops) or the chunk is reduced column-wise (reductions).
struct SegmentPlan {
  std::vector<std::vector<Run>> runs;  // per chunk
  std::vector<uint8_t> fragmented;     // per chunk
  bool any_fragmented = false;
};

// Scans the ids once (in parallel over chunks) and raises the error for an out-of-range id before
// any output is computed.
SegmentPlan plan_segments(const char* op, const int64_t* seg, int64_t P, int64_t S) {
  const int64_t nchunks = div_up(P, kChunk);
  SegmentPlan plan;
  plan.runs.resize(nchunks);
  plan.fragmented.assign(nchunks, 0);
  std::vector<int64_t> bad(nchunks, -1);
  at::parallel_for(0, nchunks, kGrainElems / kChunk, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t c0 = c * kChunk;
      const int64_t c1 = std::min(P, c0 + kChunk);
      find_runs(seg, c0, c1, S, plan.runs[c], &bad[c]);
      plan.fragmented[c] =
          static_cast<int64_t>(plan.runs[c].size()) * kMinRunLen > (c1 - c0) ? 1 : 0;
    }
  });
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = bad[c];
    TORCH_CHECK(b < 0, "fastmaml::", op, ": segments[", b, "] = ", seg[b],
                " is out of range: segment ids must lie in [0, ", S, ") for lr of shape [", S, "]");
    plan.any_fragmented = plan.any_fragmented || plan.fragmented[c];
  }
  return plan;
}

// Work items of the row-major passes: (task t, column chunk c) in row-major order, so that the
// range a thread gets is contiguous in memory.
inline int64_t grain_items() { return std::max<int64_t>(1, kGrainElems / kChunk); }

// Drives an elementwise op over [T, P].
//   row_s(t, p0, p1, a)      row t, columns [p0, p1), one scalar a
//   row_v(t, p0, p1, a_ptr)  row t, columns [p0, p1), a_ptr[i] is a for column p0 + i
template <typename scalar_t, typename RowS, typename RowV>
void elementwise_driver(const char* op, int64_t T, int64_t P, int64_t mode, const scalar_t* lr,
                        int64_t S, const int64_t* seg, const RowS& row_s, const RowV& row_v) {
  const int64_t nchunks = div_up(P, kChunk);
  if (nchunks == 0) return;
  SegmentPlan plan;
  std::vector<scalar_t> a_full;  // a gathered over the fragmented chunks
  if (mode == kLrSegment) {
    plan = plan_segments(op, seg, P, S);
    if (plan.any_fragmented) {
      a_full.resize(P);
      at::parallel_for(0, nchunks, kGrainElems / kChunk, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          if (!plan.fragmented[c]) continue;
          for (const Run& r : plan.runs[c])
            std::fill(a_full.data() + r.begin, a_full.data() + r.end, lr[r.id]);
        }
      });
    }
  }
  at::parallel_for(0, T * nchunks, grain_items(), [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      const int64_t t = w / nchunks;
      const int64_t c = w % nchunks;
      const int64_t c0 = c * kChunk;
      const int64_t c1 = std::min(P, c0 + kChunk);
      if (mode == kLrScalar) {
        row_s(t, c0, c1, lr[0]);
      } else if (mode == kLrElement) {
        row_v(t, c0, c1, lr + c0);
      } else if (plan.fragmented[c]) {
        row_v(t, c0, c1, a_full.data() + c0);
      } else {
        for (const Run& r : plan.runs[c]) row_s(t, r.begin, r.end, lr[r.id]);
      }
    }
  });
}

// Drives a segmented reduction over [T, P] (sum over tasks and over the columns of each
// segment), writing sign * result into `out` (1, S or P entries by mode).
//   row_dot(t, p0, p1) -> double          sum over row t, columns [p0, p1)
//   row_col(t, p0, p1, double* acc)       acc[i] += term at (t, p0 + i)
// Both may also write an elementwise output (reverse_step): every (t, p) is visited exactly once.
// Scalar mode and the non-fragmented chunks of per-segment mode run row-major (t, chunk) items,
// each leaving one partial sum per run; per-element mode and fragmented chunks run column-wise
// (one chunk, all tasks: acc[] sums over t). Partials are merged in a fixed order: the result
// does not depend on the number of threads.
template <typename scalar_t, typename RowDot, typename RowCol>
void reduction_driver(const char* op, int64_t T, int64_t P, int64_t mode, int64_t S,
                      const int64_t* seg, scalar_t* out, double sign, const RowDot& row_dot,
                      const RowCol& row_col) {
  const int64_t nchunks = div_up(P, kChunk);
  const int64_t nout = mode == kLrScalar ? 1 : (mode == kLrSegment ? S : P);
  if (nchunks == 0) {
    for (int64_t i = 0; i < nout; ++i) out[i] = scalar_t(0);
    return;
  }
  SegmentPlan plan;
  // Row-major partials: scalar mode: one per (t, c); segment mode: one per (t, run of a
  // non-fragmented chunk), at part[t * R + run_off[c] + r].
  std::vector<int64_t> run_off;
  int64_t R = 0;
  if (mode == kLrSegment) {
    plan = plan_segments(op, seg, P, S);
    run_off.assign(nchunks, 0);
    for (int64_t c = 0; c < nchunks; ++c) {
      run_off[c] = R;
      if (!plan.fragmented[c]) R += static_cast<int64_t>(plan.runs[c].size());
    }
  } else if (mode == kLrScalar) {
    R = nchunks;
  }
  std::vector<double> part(static_cast<size_t>(T * R), 0.0);

  if (mode != kLrElement) {
    at::parallel_for(0, T * nchunks, grain_items(), [&](int64_t wb, int64_t we) {
      for (int64_t w = wb; w < we; ++w) {
        const int64_t t = w / nchunks;
        const int64_t c = w % nchunks;
        const int64_t c0 = c * kChunk;
        const int64_t c1 = std::min(P, c0 + kChunk);
        if (mode == kLrScalar) {
          part[t * R + c] = row_dot(t, c0, c1);
        } else if (!plan.fragmented[c]) {
          double* pp = part.data() + t * R + run_off[c];
          for (const Run& r : plan.runs[c]) *pp++ = row_dot(t, r.begin, r.end);
        }
      }
    });
  }

  // Column-wise passes: acc[i] sums over all tasks for one block of columns.
  std::vector<std::vector<double>> frag_sums(mode == kLrSegment ? nchunks : 0);
  if (mode == kLrElement) {
    // Wider blocks than kChunk: each task's row piece is a long contiguous stream.
    const int64_t nblocks = div_up(P, kColBlock);
    at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrainElems / (std::max<int64_t>(T, 1) * kColBlock)),
                     [&](int64_t bb, int64_t be) {
      std::vector<double> acc(kColBlock);
      for (int64_t b = bb; b < be; ++b) {
        const int64_t c0 = b * kColBlock;
        const int64_t c1 = std::min(P, c0 + kColBlock);
        const int64_t n = c1 - c0;
        std::fill(acc.begin(), acc.begin() + n, 0.0);
        for (int64_t t = 0; t < T; ++t) row_col(t, c0, c1, acc.data());
        scalar_t* o = out + c0;
        for (int64_t i = 0; i < n; ++i) o[i] = static_cast<scalar_t>(sign * acc[i]);
      }
    });
  } else if (mode == kLrSegment && plan.any_fragmented) {
    // The fragmented chunks of per-segment mode.
    at::parallel_for(0, nchunks, std::max<int64_t>(1, grain_items() / std::max<int64_t>(T, 1)),
                     [&](int64_t cb, int64_t ce) {
      std::vector<double> acc(kChunk);
      for (int64_t c = cb; c < ce; ++c) {
        if (!plan.fragmented[c]) continue;
        const int64_t c0 = c * kChunk;
        const int64_t c1 = std::min(P, c0 + kChunk);
        const int64_t n = c1 - c0;
        std::fill(acc.begin(), acc.begin() + n, 0.0);
        for (int64_t t = 0; t < T; ++t) row_col(t, c0, c1, acc.data());
        auto& sums = frag_sums[c];
        sums.reserve(plan.runs[c].size());
        for (const Run& r : plan.runs[c]) {
          double s = 0.0;
          for (int64_t i = r.begin - c0; i < r.end - c0; ++i) s += acc[i];
          sums.push_back(s);
        }
      }
    });
  }

  // Merge in a fixed order.
  if (mode == kLrScalar) {
    double s = 0.0;
    for (double x : part) s += x;
    out[0] = static_cast<scalar_t>(sign * s);
  } else if (mode == kLrSegment) {
    std::vector<double> total(S, 0.0);
    for (int64_t c = 0; c < nchunks; ++c) {
      const auto& runs = plan.runs[c];
      if (plan.fragmented[c]) {
        for (size_t r = 0; r < runs.size(); ++r) total[runs[r].id] += frag_sums[c][r];
      } else {
        for (int64_t t = 0; t < T; ++t) {
          const double* pp = part.data() + t * R + run_off[c];
          for (size_t r = 0; r < runs.size(); ++r) total[runs[r].id] += pp[r];
        }
      }
    }
    for (int64_t s = 0; s < S; ++s) out[s] = static_cast<scalar_t>(sign * total[s]);
  }
}

// ---------------------------------------------------------------------------------------------
// Row kernels (restrict-qualified plain loops; -O3 vectorizes them)
// ---------------------------------------------------------------------------------------------

// o = x - a * y
template <typename T>
inline void sub_scaled_s(T* __restrict__ o, const T* __restrict__ x, const T* __restrict__ y, T a,
                         int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = x[i] - a * y[i];
}
template <typename T>
inline void sub_scaled_v(T* __restrict__ o, const T* __restrict__ x, const T* __restrict__ y,
                         const T* __restrict__ a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = x[i] - a[i] * y[i];
}

// o = a * x
template <typename T>
inline void mul_s(T* __restrict__ o, const T* __restrict__ x, T a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = a * x[i];
}
template <typename T>
inline void mul_v(T* __restrict__ o, const T* __restrict__ x, const T* __restrict__ a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = a[i] * x[i];
}

// sum_i x[i] * y[i] in double, kLanes independent accumulators.
template <typename T>
inline double dot_row(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j)
      lane[j] += static_cast<double>(x[i + j]) * static_cast<double>(y[i + j]);
  double tail = 0.0;
  for (; i < n; ++i) tail += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])) +
         tail;
}

// acc[i] += x[i] * y[i]
template <typename T>
inline void dot_col(double* __restrict__ acc, const T* __restrict__ x, const T* __restrict__ y,
                    int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    acc[i] += static_cast<double>(x[i]) * static_cast<double>(y[i]);
}

// reverse_step element: o = v - hv + w * gq (terms present per HV / GQ), rounded like the
// reference ((v - hv) + (w * gq), each in T).
template <typename T, bool HV, bool GQ>
inline T rev_elem(T v, const T* __restrict__ hv, const T* __restrict__ gq, T w, int64_t i) {
  T r = v;
  if (HV) r = r - hv[i];
  if (GQ) r = r + w * gq[i];
  return r;
}

// Fused reverse_step row: writes o and returns sum_i v[i] * g[i].
template <typename T, bool HV, bool GQ>
inline double rev_row(T* __restrict__ o, const T* __restrict__ v, const T* __restrict__ hv,
                      const T* __restrict__ g, const T* __restrict__ gq, T w, int64_t n) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const T vv = v[i + j];
      o[i + j] = rev_elem<T, HV, GQ>(vv, hv, gq, w, i + j);
      lane[j] += static_cast<double>(vv) * static_cast<double>(g[i + j]);
    }
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    const T vv = v[i];
    o[i] = rev_elem<T, HV, GQ>(vv, hv, gq, w, i);
    tail += static_cast<double>(vv) * static_cast<double>(g[i]);
  }
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])) +
         tail;
}

template <typename T, bool HV, bool GQ>
inline void rev_col(T* __restrict__ o, const T* __restrict__ v, const T* __restrict__ hv,
                    const T* __restrict__ g, const T* __restrict__ gq, T w,
                    double* __restrict__ acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T vv = v[i];
    o[i] = rev_elem<T, HV, GQ>(vv, hv, gq, w, i);
    acc[i] += static_cast<double>(vv) * static_cast<double>(g[i]);
  }
}

void check_cpu_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastmaml::", op,
              ": ", name, " must be float32 or float64 on the CPU, got ", t.scalar_type());
}

const int64_t* seg_ptr(int64_t mode, const std::optional<at::Tensor>& segments, at::Tensor& keep) {
  if (mode != kLrSegment) return nullptr;
  keep = segments->contiguous();
  return keep.const_data_ptr<int64_t>();
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------

at::Tensor inner_update_cpu(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                            const std::optional<at::Tensor>& segments) {
  const char* op = "inner_update";
  check_operand(op, "theta", theta, theta, "theta");
  check_cpu_dtype(op, "theta", theta);
  check_operand(op, "grad", grad, theta, "theta");
  int64_t T = 0, P = 0, num_lr = 0;
  detail::check_inner_update_shapes(theta, grad, &T, &P);
  const int64_t mode = check_lr(op, theta, "theta", lr, segments, P, &num_lr);

  const at::Tensor th = theta.contiguous();
  const at::Tensor gr = grad.contiguous();
  const at::Tensor lr_c = lr.contiguous();
  at::Tensor seg_keep;
  const int64_t* seg = seg_ptr(mode, segments, seg_keep);
  at::Tensor out = (theta.dim() == 2 || grad.dim() == 2) ? at::empty({T, P}, theta.options())
                                                          : at::empty({P}, theta.options());
  const int64_t ts = theta.dim() == 2 ? P : 0;  // task stride: 0 broadcasts a shared [P] vector
  const int64_t gs = grad.dim() == 2 ? P : 0;

  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml_inner_update_cpu", [&] {
    const scalar_t* thp = th.const_data_ptr<scalar_t>();
    const scalar_t* grp = gr.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    auto row_s = [&](int64_t t, int64_t p0, int64_t p1, scalar_t a) {
      sub_scaled_s<scalar_t>(op_ + t * P + p0, thp + t * ts + p0, grp + t * gs + p0, a, p1 - p0);
    };
    auto row_v = [&](int64_t t, int64_t p0, int64_t p1, const scalar_t* a) {
      sub_scaled_v<scalar_t>(op_ + t * P + p0, thp + t * ts + p0, grp + t * gs + p0, a, p1 - p0);
    };
    elementwise_driver<scalar_t>(op, T, P, mode, lr_c.const_data_ptr<scalar_t>(), num_lr, seg,
                                 row_s, row_v);
  });
  return out;
}

at::Tensor scale_cpu(const at::Tensor& v, const at::Tensor& lr,
                     const std::optional<at::Tensor>& segments) {
  const char* op = "scale";
  check_operand(op, "v", v, v, "v");
  check_cpu_dtype(op, "v", v);
  const int64_t P = v.size(-1);
  const int64_t T = v.dim() == 2 ? v.size(0) : 1;
  int64_t num_lr = 0;
  const int64_t mode = check_lr(op, v, "v", lr, segments, P, &num_lr);

  const at::Tensor vc = v.contiguous();
  const at::Tensor lr_c = lr.contiguous();
  at::Tensor seg_keep;
  const int64_t* seg = seg_ptr(mode, segments, seg_keep);
  at::Tensor out = at::empty(v.sizes(), v.options());

  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "fastmaml_scale_cpu", [&] {
    const scalar_t* vp = vc.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    auto row_s = [&](int64_t t, int64_t p0, int64_t p1, scalar_t a) {
      mul_s<scalar_t>(op_ + t * P + p0, vp + t * P + p0, a, p1 - p0);
    };
    auto row_v = [&](int64_t t, int64_t p0, int64_t p1, const scalar_t* a) {
      mul_v<scalar_t>(op_ + t * P + p0, vp + t * P + p0, a, p1 - p0);
    };
    elementwise_driver<scalar_t>(op, T, P, mode, lr_c.const_data_ptr<scalar_t>(), num_lr, seg,
                                 row_s, row_v);
  });
  return out;
}

at::Tensor segment_dot_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& lr,
                           const std::optional<at::Tensor>& segments) {
  const char* op = "segment_dot";
  check_operand(op, "a", a, a, "a");
  check_cpu_dtype(op, "a", a);
  check_operand(op, "b", b, a, "a");
  check_same_shape(op, "b", b, a, "a");
  const int64_t P = a.size(-1);
  const int64_t T = a.dim() == 2 ? a.size(0) : 1;
  int64_t num_lr = 0;
  const int64_t mode = check_lr(op, a, "a", lr, segments, P, &num_lr);

  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  at::Tensor seg_keep;
  const int64_t* seg = seg_ptr(mode, segments, seg_keep);
  at::Tensor out = at::empty(lr.sizes(), lr.options());

  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastmaml_segment_dot_cpu", [&] {
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    auto row_dot = [&](int64_t t, int64_t p0, int64_t p1) -> double {
      return dot_row<scalar_t>(ap + t * P + p0, bp + t * P + p0, p1 - p0);
    };
    auto row_col = [&](int64_t t, int64_t p0, int64_t p1, double* acc) {
      dot_col<scalar_t>(acc, ap + t * P + p0, bp + t * P + p0, p1 - p0);
    };
    reduction_driver<scalar_t>(op, T, P, mode, num_lr, seg, out.mutable_data_ptr<scalar_t>(), 1.0,
                               row_dot, row_col);
  });
  return out;
}

template <typename scalar_t, bool HV, bool GQ>
void reverse_step_impl(const char* op, int64_t T, int64_t P, int64_t mode, int64_t num_lr,
                       const int64_t* seg, scalar_t* o, scalar_t* d_lr, const scalar_t* v,
                       const scalar_t* hv, const scalar_t* g, const scalar_t* gq, scalar_t w) {
  auto off = [P](const scalar_t* p, int64_t t, int64_t p0) -> const scalar_t* {
    return p == nullptr ? nullptr : p + t * P + p0;
  };
  auto row_dot = [&](int64_t t, int64_t p0, int64_t p1) -> double {
    return rev_row<scalar_t, HV, GQ>(o + t * P + p0, v + t * P + p0, off(hv, t, p0),
                                     g + t * P + p0, off(gq, t, p0), w, p1 - p0);
  };
  auto row_col = [&](int64_t t, int64_t p0, int64_t p1, double* acc) {
    rev_col<scalar_t, HV, GQ>(o + t * P + p0, v + t * P + p0, off(hv, t, p0), g + t * P + p0,
                              off(gq, t, p0), w, acc, p1 - p0);
  };
  reduction_driver<scalar_t>(op, T, P, mode, num_lr, seg, d_lr, -1.0, row_dot, row_col);
}

std::tuple<at::Tensor, at::Tensor> reverse_step_cpu(const at::Tensor& v,
                                                    const std::optional<at::Tensor>& hv,
                                                    const at::Tensor& g,
                                                    const std::optional<at::Tensor>& gq, double w,
                                                    const at::Tensor& lr,
                                                    const std::optional<at::Tensor>& segments) {
  const char* op = "reverse_step";
  check_operand(op, "v", v, v, "v");
  check_cpu_dtype(op, "v", v);
  const bool has_hv = hv.has_value() && hv->defined();
  // Like the reference: the gq term is dropped when gq is None or w == 0.
  const bool has_gq = gq.has_value() && gq->defined() && w != 0.0;
  if (hv.has_value() && hv->defined()) {
    check_operand(op, "hv", *hv, v, "v");
    check_same_shape(op, "hv", *hv, v, "v");
  }
  check_operand(op, "g", g, v, "v");
  check_same_shape(op, "g", g, v, "v");
  if (gq.has_value() && gq->defined()) {
    check_operand(op, "gq", *gq, v, "v");
    check_same_shape(op, "gq", *gq, v, "v");
  }
  const int64_t P = v.size(-1);
  const int64_t T = v.dim() == 2 ? v.size(0) : 1;
  int64_t num_lr = 0;
  const int64_t mode = check_lr(op, v, "v", lr, segments, P, &num_lr);

  const at::Tensor vc = v.contiguous();
  const at::Tensor gc = g.contiguous();
  const at::Tensor hvc = has_hv ? hv->contiguous() : at::Tensor();
  const at::Tensor gqc = has_gq ? gq->contiguous() : at::Tensor();
  at::Tensor seg_keep;
  const int64_t* seg = seg_ptr(mode, segments, seg_keep);
  at::Tensor out = at::empty(v.sizes(), v.options());
  at::Tensor d_lr = at::empty(lr.sizes(), lr.options());

  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "fastmaml_reverse_step_cpu", [&] {
    const scalar_t* vp = vc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* hvp = has_hv ? hvc.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gqp = has_gq ? gqc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    scalar_t* dp = d_lr.mutable_data_ptr<scalar_t>();
    const scalar_t ws = static_cast<scalar_t>(w);
    if (has_hv && has_gq)
      reverse_step_impl<scalar_t, true, true>(op, T, P, mode, num_lr, seg, op_, dp, vp, hvp, gp, gqp, ws);
    else if (has_hv)
      reverse_step_impl<scalar_t, true, false>(op, T, P, mode, num_lr, seg, op_, dp, vp, hvp, gp, gqp, ws);
    else if (has_gq)
      reverse_step_impl<scalar_t, false, true>(op, T, P, mode, num_lr, seg, op_, dp, vp, hvp, gp, gqp, ws);
    else
      reverse_step_impl<scalar_t, false, false>(op, T, P, mode, num_lr, seg, op_, dp, vp, hvp, gp, gqp, ws);
  });
  return std::make_tuple(out, d_lr);
}

}  // namespace
}  // namespace cpu
}  // namespace fastmaml

// Exactly the strings of fastmaml/kernels/schemas.py (a test compares them).
TORCH_LIBRARY(fastmaml, m) {
  m.def("inner_update(Tensor theta, Tensor grad, Tensor lr, Tensor? segments) -> Tensor");
  m.def("scale(Tensor v, Tensor lr, Tensor? segments) -> Tensor");
  m.def("segment_dot(Tensor a, Tensor b, Tensor lr, Tensor? segments) -> Tensor");
  m.def(
      "reverse_step(Tensor v, Tensor? hv, Tensor g, Tensor? gq, float w, Tensor lr, Tensor? "
      "segments) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("inner_update", &fastmaml::cpu::inner_update_cpu);
  m.impl("scale", &fastmaml::cpu::scale_cpu);
  m.impl("segment_dot", &fastmaml::cpu::segment_dot_cpu);
  m.impl("reverse_step", &fastmaml::cpu::reverse_step_cpu);
}

// fastmaml fused CUDA ops: host launchers (plain CUDA, no ATen/c10/torch).
//
// This header is included by csrc/cuda/cuda_ops.cpp (compiled by the host C++ compiler) and by
// csrc/cuda/fused_ops.cu (nvcc). It declares host functions only; the kernels live in the .cu file.
// Compile the device code alone with, e.g.:
//     nvcc -std=c++17 -O3 -arch=sm_90 -c csrc/cuda/fused_ops.cu -o /tmp/fused_ops.o
//
// Layout (docs/design.md §3.1): T tasks' fast weights are one row-major [T, P] buffer
// (num_tasks = T rows of P elements); meta-parameters are [P]. All pointers are device pointers
// to contiguous memory. A learning rate has one of three forms (LrMode):
//   kLrScalar   lr[0]                        (num_lr = 1; segments unused, may be null)
//   kLrSegment  lr[segments[p]], lr has S    (num_lr = S; segments: int64 [P], ids in [0, S))
//   kLrElement  lr[p], lr has P entries      (num_lr = P; segments unused, may be null)
// and a[p] denotes that per-element rate. Segment ids are not validated on the host (that would
// need a device sync): an id outside [0, num_lr) never causes an out-of-bounds access; it yields
// NaN in elementwise outputs and is left out of reductions. Validate ids beforehand (the Python
// layer does).
//
// Types: float, double, __half and __nv_bfloat16. Arithmetic is done in AccT (float for
// float/half/bfloat16, double for double) and rounded once to the output type; reductions
// accumulate in AccT.
//
// Reductions (segment_dot, reverse_step's d_lr) use a caller-provided workspace of num_out AccT
// values: it is zeroed with cudaMemsetAsync, each block adds its segmented partial sums into it with
// atomicAdd (so float results may differ in the last bits from run to run), and a final kernel
// writes sign * workspace to the output in the output type.
//
// Every launcher enqueues on `stream`, never synchronizes, and returns cudaGetLastError() (or
// cudaSuccess when there is nothing to do); a non-success return means a launch failed.

#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace fastmaml {
namespace cuda {

enum LrMode : int { kLrScalar = 0, kLrSegment = 1, kLrElement = 2 };

// inner_update: out[t, p] = theta[t, p] - a[p] * grad[t, p] for t < num_tasks, p < P.
//   out: [num_tasks, P]. theta / grad: [num_tasks, P] when *_per_task, else one [P] row shared by
//   all tasks (broadcast). lr: num_lr entries as described above.
cudaError_t launch_inner_update(float* out, const float* theta, const float* grad, int64_t num_tasks,
                                int64_t P, bool theta_per_task, bool grad_per_task, const float* lr,
                                const int64_t* segments, int64_t num_lr, LrMode mode,
                                cudaStream_t stream);
cudaError_t launch_inner_update(double* out, const double* theta, const double* grad,
                                int64_t num_tasks, int64_t P, bool theta_per_task,
                                bool grad_per_task, const double* lr, const int64_t* segments,
                                int64_t num_lr, LrMode mode, cudaStream_t stream);
cudaError_t launch_inner_update(__half* out, const __half* theta, const __half* grad,
                                int64_t num_tasks, int64_t P, bool theta_per_task,
                                bool grad_per_task, const __half* lr, const int64_t* segments,
                                int64_t num_lr, LrMode mode, cudaStream_t stream);
cudaError_t launch_inner_update(__nv_bfloat16* out, const __nv_bfloat16* theta,
                                const __nv_bfloat16* grad, int64_t num_tasks, int64_t P,
                                bool theta_per_task, bool grad_per_task, const __nv_bfloat16* lr,
                                const int64_t* segments, int64_t num_lr, LrMode mode,
                                cudaStream_t stream);

// scale: out[t, p] = a[p] * v[t, p]; v and out [num_tasks, P] (num_tasks = 1 for a [P] vector).
cudaError_t launch_scale(float* out, const float* v, int64_t num_tasks, int64_t P, const float* lr,
                         const int64_t* segments, int64_t num_lr, LrMode mode, cudaStream_t stream);
cudaError_t launch_scale(double* out, const double* v, int64_t num_tasks, int64_t P,
                         const double* lr, const int64_t* segments, int64_t num_lr, LrMode mode,
                         cudaStream_t stream);
cudaError_t launch_scale(__half* out, const __half* v, int64_t num_tasks, int64_t P,
                         const __half* lr, const int64_t* segments, int64_t num_lr, LrMode mode,
                         cudaStream_t stream);
cudaError_t launch_scale(__nv_bfloat16* out, const __nv_bfloat16* v, int64_t num_tasks, int64_t P,
                         const __nv_bfloat16* lr, const int64_t* segments, int64_t num_lr,
                         LrMode mode, cudaStream_t stream);

// segment_dot: out[k] = sum_t sum_{p : key(p) = k} a[t, p] * b[t, p], with key(p) = 0 (scalar,
//   num_out = 1), segments[p] (per segment, num_out = S) or p (per element, num_out = P).
//   a, b: [num_tasks, P]. out: num_out values. workspace: num_out AccT values (float, or double
//   for double), overwritten.
cudaError_t launch_segment_dot(float* out, const float* a, const float* b, int64_t num_tasks,
                               int64_t P, const int64_t* segments, int64_t num_out, LrMode mode,
                               float* workspace, cudaStream_t stream);
cudaError_t launch_segment_dot(double* out, const double* a, const double* b, int64_t num_tasks,
                               int64_t P, const int64_t* segments, int64_t num_out, LrMode mode,
                               double* workspace, cudaStream_t stream);
cudaError_t launch_segment_dot(__half* out, const __half* a, const __half* b, int64_t num_tasks,
                               int64_t P, const int64_t* segments, int64_t num_out, LrMode mode,
                               float* workspace, cudaStream_t stream);
cudaError_t launch_segment_dot(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b,
                               int64_t num_tasks, int64_t P, const int64_t* segments,
                               int64_t num_out, LrMode mode, float* workspace,
                               cudaStream_t stream);

// reverse_step, one pass over memory for both outputs:
//   out[t, p] = v[t, p] - hv[t, p] + w * gq[t, p]     (hv == nullptr: no hv term;
//                                                      gq == nullptr: no gq term)
//   d_lr[k]   = -sum_t sum_{p : key(p) = k} v[t, p] * g[t, p]   (key as for segment_dot)
//   v, hv, g, gq, out: [num_tasks, P]; d_lr: num_out values; workspace: num_out AccT values.
cudaError_t launch_reverse_step(float* out, float* d_lr, const float* v, const float* hv,
                                const float* g, const float* gq, double w, int64_t num_tasks,
                                int64_t P, const int64_t* segments, int64_t num_out, LrMode mode,
                                float* workspace, cudaStream_t stream);
cudaError_t launch_reverse_step(double* out, double* d_lr, const double* v, const double* hv,
                                const double* g, const double* gq, double w, int64_t num_tasks,
                                int64_t P, const int64_t* segments, int64_t num_out, LrMode mode,
                                double* workspace, cudaStream_t stream);
cudaError_t launch_reverse_step(__half* out, __half* d_lr, const __half* v, const __half* hv,
                                const __half* g, const __half* gq, double w, int64_t num_tasks,
                                int64_t P, const int64_t* segments, int64_t num_out, LrMode mode,
                                float* workspace, cudaStream_t stream);
cudaError_t launch_reverse_step(__nv_bfloat16* out, __nv_bfloat16* d_lr, const __nv_bfloat16* v,
                                const __nv_bfloat16* hv, const __nv_bfloat16* g,
                                const __nv_bfloat16* gq, double w, int64_t num_tasks, int64_t P,
                                const int64_t* segments, int64_t num_out, LrMode mode,
                                float* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmaml

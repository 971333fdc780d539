// fastmaml fused CUDA ops: kernels and host launchers (plain CUDA: no ATen/c10/torch headers).
// Declarations, shapes and conventions: csrc/cuda/fused_ops.cuh.
//
// Work layout shared by all kernels: a 2-D grid. blockIdx.x * blockDim.x + threadIdx.x is a
// column p < P (consecutive threads take consecutive columns, so every access is coalesced);
// blockIdx.y picks a contiguous range of tasks_per_block tasks. A thread looks up its rate a[p]
// (or segment id) once and loops over its tasks: for task t it touches element t * P + p.
//
// Reductions: each thread sums its column over its tasks, then the block combines the column sums
// that share a key (segment id): when every column of the block has one key (always in scalar
// mode, and in per-segment mode whenever the block lies inside one segment, the usual case) by a
// block reduction and ONE atomicAdd; otherwise by a segmented reduction over the maximal runs of
// equal keys inside each warp, with one atomicAdd per run (correct for any id pattern). Per-element
// mode adds each column sum straight into its own workspace entry.
//
// Compiles with any of -std=c++17/c++20 and with torch's -D__CUDA_NO_HALF_OPERATORS__,
// -D__CUDA_NO_HALF_CONVERSIONS__, -D__CUDA_NO_BFLOAT16_CONVERSIONS__ (only explicit conversion
// intrinsics are used).

#include "fused_ops.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastmaml {
namespace cuda {
namespace {

constexpr int kThreads = 256;          // threads per block (a multiple of 32)
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTargetBlocks = 2048;  // aim: a couple of waves of resident blocks on big GPUs
constexpr int64_t kMaxGridY = 65535;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Types: AccT and explicit conversions
// ---------------------------------------------------------------------------------------------

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
struct Store;
template <>
struct Store<float> {
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Store<double> {
  static __device__ __forceinline__ double from(double x) { return x; }
};
template <>
struct Store<__half> {
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float quiet_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double quiet_nan(double) {
  return __longlong_as_double(0x7ff8000000000000LL);
}

__device__ __forceinline__ void atomic_add(float* addr, float v) { atomicAdd(addr, v); }
__device__ __forceinline__ void atomic_add(double* addr, double v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 600
  atomicAdd(addr, v);
#else
  unsigned long long* p = reinterpret_cast<unsigned long long*>(addr);
  unsigned long long old = *p, assumed;
  do {
    assumed = old;
    old = atomicCAS(p, assumed, __double_as_longlong(v + __longlong_as_double(assumed)));
  } while (assumed != old);
#endif
}

// The per-element rate a[p] in AccT. Out-of-range segment ids give NaN (never an OOB read).
template <typename T, int MODE>
__device__ __forceinline__ acc_t<T> rate_at(const T* __restrict__ lr,
                                            const int64_t* __restrict__ segments, int64_t num_lr,
                                            int64_t p) {
  if (MODE == kLrScalar) return to_acc(lr[0]);
  if (MODE == kLrElement) return to_acc(lr[p]);
  const int64_t s = segments[p];
  if (s < 0 || s >= num_lr) return quiet_nan(acc_t<T>());
  return to_acc(lr[s]);
}

// ---------------------------------------------------------------------------------------------
// Elementwise kernels
// ---------------------------------------------------------------------------------------------

/// inner_update_kernel<T, MODE>
///   out[t, p] = theta[t * theta_stride + p] - a[p] * grad[t * grad_stride + p]
///   out: [num_tasks, P]; theta_stride / grad_stride: P for a [T, P] operand, 0 for a shared [P]
///   row. Computed in AccT, rounded once. Thread = column p, tasks
///   [blockIdx.y * tasks_per_block, +tasks_per_block).
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads)
    inner_update_kernel(T* __restrict__ out, const T* __restrict__ theta,
                        const T* __restrict__ grad, int64_t num_tasks, int64_t P,
                        int64_t theta_stride, int64_t grad_stride, const T* __restrict__ lr,
                        const int64_t* __restrict__ segments, int64_t num_lr,
                        int64_t tasks_per_block) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const acc_t<T> a = rate_at<T, MODE>(lr, segments, num_lr, p);
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tasks_per_block;
  const int64_t t1 = t0 + tasks_per_block < num_tasks ? t0 + tasks_per_block : num_tasks;
#pragma unroll 4
  for (int64_t t = t0; t < t1; ++t) {
    const acc_t<T> x = to_acc(theta[t * theta_stride + p]);
    const acc_t<T> g = to_acc(grad[t * grad_stride + p]);
    out[t * P + p] = Store<T>::from(x - a * g);
  }
}

/// scale_kernel<T, MODE>
///   out[t, p] = a[p] * v[t, p];  v, out: [num_tasks, P]. Same thread layout as inner_update.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(T* __restrict__ out, const T* __restrict__ v, int64_t num_tasks, int64_t P,
                 const T* __restrict__ lr, const int64_t* __restrict__ segments, int64_t num_lr,
                 int64_t tasks_per_block) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const acc_t<T> a = rate_at<T, MODE>(lr, segments, num_lr, p);
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tasks_per_block;
  const int64_t t1 = t0 + tasks_per_block < num_tasks ? t0 + tasks_per_block : num_tasks;
#pragma unroll 4
  for (int64_t t = t0; t < t1; ++t) out[t * P + p] = Store<T>::from(a * to_acc(v[t * P + p]));
}

// ---------------------------------------------------------------------------------------------
// Block-level segmented accumulation
// ---------------------------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(kFullMask, x, off);
  return x;
}

// Sum of x over the block; the result is valid in thread 0. All threads must call it.
template <typename A>
__device__ __forceinline__ A block_sum(A x) {
  __shared__ A partial[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  A total = A(0);
  if (warp == 0) {
    total = lane < kWarps ? partial[lane] : A(0);
    total = warp_sum(total);
  }
  return total;
}

/// accumulate_by_key<MODE>: adds each thread's column sum `val` into ws[key(p)], key(p) = 0
/// (scalar), segments[p] (per segment) or p (per element). `valid` is p < P. Keys outside
/// [0, num_out) are dropped. Every thread of the block must call it (it synchronizes).
template <int MODE, typename A>
__device__ __forceinline__ void accumulate_by_key(A* __restrict__ ws, A val, bool valid, int64_t p,
                                                  const int64_t* __restrict__ segments,
                                                  int64_t num_out) {
  if (MODE == kLrElement) {
    if (valid) atomic_add(ws + p, val);
    return;
  }
  if (MODE == kLrScalar) {
    const A total = block_sum(valid ? val : A(0));
    if (threadIdx.x == 0) atomic_add(ws, total);
    return;
  }
  // Per segment. The block's first column always exists (p of thread 0 < P).
  __shared__ long long first_key;
  if (threadIdx.x == 0) first_key = static_cast<long long>(segments[p]);
  __syncthreads();
  long long key = valid ? static_cast<long long>(segments[p]) : first_key;
  if (!valid) val = A(0);
  if (__syncthreads_and(key == first_key)) {
    // One segment covers the whole block: one block reduction, one atomic.
    const A total = block_sum(val);
    if (threadIdx.x == 0 && first_key >= 0 && first_key < num_out) atomic_add(ws + first_key, total);
    return;
  }
  // Segmented suffix sums over maximal runs of equal keys within the warp: after the loop, the
  // first lane of each run holds the run's total. stop = "a run ends within [lane, lane+span)".
  const int lane = threadIdx.x & 31;
  const long long next_key = __shfl_down_sync(kFullMask, key, 1);
  const long long prev_key = __shfl_up_sync(kFullMask, key, 1);
  const bool head = lane == 0 || prev_key != key;
  int stop = (lane == 31 || next_key != key) ? 1 : 0;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const A other = __shfl_down_sync(kFullMask, val, off);
    const int other_stop = __shfl_down_sync(kFullMask, stop, off);
    if (lane + off < 32) {
      if (!stop) val += other;
      stop |= other_stop;
    }
  }
  if (head && key >= 0 && key < num_out) atomic_add(ws + key, val);
}

// ---------------------------------------------------------------------------------------------
// Reduction kernels
// ---------------------------------------------------------------------------------------------

/// segment_dot_kernel<T, MODE>
///   ws[key(p)] += sum_{t in block's tasks} a[t, p] * b[t, p]   (AccT accumulation)
///   a, b: [num_tasks, P]; ws: num_out AccT values, zeroed beforehand; key as in accumulate_by_key.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads)
    segment_dot_kernel(acc_t<T>* __restrict__ ws, const T* __restrict__ a,
                       const T* __restrict__ b, int64_t num_tasks, int64_t P,
                       const int64_t* __restrict__ segments, int64_t num_out,
                       int64_t tasks_per_block) {
  using A = acc_t<T>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = p < P;
  A sum = A(0);
  if (valid) {
    const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tasks_per_block;
    const int64_t t1 = t0 + tasks_per_block < num_tasks ? t0 + tasks_per_block : num_tasks;
#pragma unroll 4
    for (int64_t t = t0; t < t1; ++t) sum += to_acc(a[t * P + p]) * to_acc(b[t * P + p]);
  }
  accumulate_by_key<MODE>(ws, sum, valid, p, segments, num_out);
}

/// reverse_step_kernel<T, MODE>, one pass over memory for both outputs:
///   out[t, p] = v[t, p] - hv[t, p] + w * gq[t, p]   (hv / gq null: the term is absent)
///   ws[key(p)] += sum_{t in block's tasks} v[t, p] * g[t, p]
///   v, hv, g, gq, out: [num_tasks, P]; ws: num_out AccT values, zeroed beforehand. The final
///   d_lr = -ws is written by finalize_kernel.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads)
    reverse_step_kernel(T* __restrict__ out, acc_t<T>* __restrict__ ws, const T* __restrict__ v,
                        const T* __restrict__ hv, const T* __restrict__ g,
                        const T* __restrict__ gq, acc_t<T> w, int64_t num_tasks, int64_t P,
                        const int64_t* __restrict__ segments, int64_t num_out,
                        int64_t tasks_per_block) {
  using A = acc_t<T>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = p < P;
  A sum = A(0);
  if (valid) {
    const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tasks_per_block;
    const int64_t t1 = t0 + tasks_per_block < num_tasks ? t0 + tasks_per_block : num_tasks;
    const bool has_hv = hv != nullptr;
    const bool has_gq = gq != nullptr;
#pragma unroll 4
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t * P + p;
      const A vv = to_acc(v[i]);
      sum += vv * to_acc(g[i]);
      A r = vv;
      if (has_hv) r -= to_acc(hv[i]);
      if (has_gq) r += w * to_acc(gq[i]);
      out[i] = Store<T>::from(r);
    }
  }
  accumulate_by_key<MODE>(ws, sum, valid, p, segments, num_out);
}

/// finalize_kernel<T>: out[i] = sign * ws[i] rounded to T, for i < n.
template <typename T>
__global__ void finalize_kernel(T* __restrict__ out, const acc_t<T>* __restrict__ ws, int64_t n,
                                acc_t<T> sign) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = Store<T>::from(sign * ws[i]);
}

// ---------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Grid {
  dim3 grid;
  int64_t tasks_per_block;
};

// Requires num_tasks >= 1 and P >= 1.
Grid make_grid(int64_t num_tasks, int64_t P) {
  const int64_t bx = ceil_div(P, kThreads);
  int64_t by = ceil_div(kTargetBlocks, bx);
  if (by > num_tasks) by = num_tasks;
  if (by < 1) by = 1;
  int64_t tpb = ceil_div(num_tasks, by);
  const int64_t min_tpb = ceil_div(num_tasks, kMaxGridY);
  if (tpb < min_tpb) tpb = min_tpb;
  by = ceil_div(num_tasks, tpb);
  Grid g;
  g.grid = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by), 1);
  g.tasks_per_block = tpb;
  return g;
}

template <typename T>
cudaError_t finalize(T* out, const acc_t<T>* ws, int64_t n, acc_t<T> sign, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  int64_t blocks = ceil_div(n, kThreads);
  if (blocks > 4096) blocks = 4096;
  finalize_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(out, ws, n, sign);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Launchers (templates; the overloads declared in the header forward here)
// ---------------------------------------------------------------------------------------------

template <typename T>
cudaError_t inner_update_impl(T* out, const T* theta, const T* grad, int64_t num_tasks, int64_t P,
                              bool theta_per_task, bool grad_per_task, const T* lr,
                              const int64_t* segments, int64_t num_lr, LrMode mode,
                              cudaStream_t stream) {
  if (num_tasks <= 0 || P <= 0) return cudaSuccess;
  const Grid g = make_grid(num_tasks, P);
  const int64_t ts = theta_per_task ? P : 0;
  const int64_t gs = grad_per_task ? P : 0;
  switch (mode) {
    case kLrScalar:
      inner_update_kernel<T, kLrScalar><<<g.grid, kThreads, 0, stream>>>(
          out, theta, grad, num_tasks, P, ts, gs, lr, segments, num_lr, g.tasks_per_block);
      break;
    case kLrSegment:
      inner_update_kernel<T, kLrSegment><<<g.grid, kThreads, 0, stream>>>(
          out, theta, grad, num_tasks, P, ts, gs, lr, segments, num_lr, g.tasks_per_block);
      break;
    case kLrElement:
      inner_update_kernel<T, kLrElement><<<g.grid, kThreads, 0, stream>>>(
          out, theta, grad, num_tasks, P, ts, gs, lr, segments, num_lr, g.tasks_per_block);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t scale_impl(T* out, const T* v, int64_t num_tasks, int64_t P, const T* lr,
                       const int64_t* segments, int64_t num_lr, LrMode mode, cudaStream_t stream) {
  if (num_tasks <= 0 || P <= 0) return cudaSuccess;
  const Grid g = make_grid(num_tasks, P);
  switch (mode) {
    case kLrScalar:
      scale_kernel<T, kLrScalar><<<g.grid, kThreads, 0, stream>>>(out, v, num_tasks, P, lr, segments,
                                                                  num_lr, g.tasks_per_block);
      break;
    case kLrSegment:
      scale_kernel<T, kLrSegment><<<g.grid, kThreads, 0, stream>>>(out, v, num_tasks, P, lr,
                                                                   segments, num_lr,
                                                                   g.tasks_per_block);
      break;
    case kLrElement:
      scale_kernel<T, kLrElement><<<g.grid, kThreads, 0, stream>>>(out, v, num_tasks, P, lr,
                                                                   segments, num_lr,
                                                                   g.tasks_per_block);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t segment_dot_impl(T* out, const T* a, const T* b, int64_t num_tasks, int64_t P,
                             const int64_t* segments, int64_t num_out, LrMode mode,
                             acc_t<T>* workspace, cudaStream_t stream) {
  if (num_out <= 0) return cudaSuccess;
  if (mode != kLrScalar && mode != kLrSegment && mode != kLrElement) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(workspace, 0, sizeof(acc_t<T>) * num_out, stream);
  if (err != cudaSuccess) return err;
  if (num_tasks > 0 && P > 0) {
    const Grid g = make_grid(num_tasks, P);
    if (mode == kLrScalar)
      segment_dot_kernel<T, kLrScalar><<<g.grid, kThreads, 0, stream>>>(
          workspace, a, b, num_tasks, P, segments, num_out, g.tasks_per_block);
    else if (mode == kLrSegment)
      segment_dot_kernel<T, kLrSegment><<<g.grid, kThreads, 0, stream>>>(
          workspace, a, b, num_tasks, P, segments, num_out, g.tasks_per_block);
    else
      segment_dot_kernel<T, kLrElement><<<g.grid, kThreads, 0, stream>>>(
          workspace, a, b, num_tasks, P, segments, num_out, g.tasks_per_block);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finalize<T>(out, workspace, num_out, acc_t<T>(1), stream);
}

template <typename T>
cudaError_t reverse_step_impl(T* out, T* d_lr, const T* v, const T* hv, const T* g, const T* gq,
                              double w, int64_t num_tasks, int64_t P, const int64_t* segments,
                              int64_t num_out, LrMode mode, acc_t<T>* workspace,
                              cudaStream_t stream) {
  if (mode != kLrScalar && mode != kLrSegment && mode != kLrElement) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  if (num_out > 0) {
    err = cudaMemsetAsync(workspace, 0, sizeof(acc_t<T>) * num_out, stream);
    if (err != cudaSuccess) return err;
  }
  if (num_tasks > 0 && P > 0) {
    const Grid gr = make_grid(num_tasks, P);
    const acc_t<T> wa = static_cast<acc_t<T>>(w);
    if (mode == kLrScalar)
      reverse_step_kernel<T, kLrScalar><<<gr.grid, kThreads, 0, stream>>>(
          out, workspace, v, hv, g, gq, wa, num_tasks, P, segments, num_out, gr.tasks_per_block);
    else if (mode == kLrSegment)
      reverse_step_kernel<T, kLrSegment><<<gr.grid, kThreads, 0, stream>>>(
          out, workspace, v, hv, g, gq, wa, num_tasks, P, segments, num_out, gr.tasks_per_block);
    else
      reverse_step_kernel<T, kLrElement><<<gr.grid, kThreads, 0, stream>>>(
          out, workspace, v, hv, g, gq, wa, num_tasks, P, segments, num_out, gr.tasks_per_block);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finalize<T>(d_lr, workspace, num_out, acc_t<T>(-1), stream);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The overloads of fused_ops.cuh
// ---------------------------------------------------------------------------------------------

#define FASTMAML_DEFINE_LAUNCHERS(T)                                                              \
  cudaError_t launch_inner_update(T* out, const T* theta, const T* grad, int64_t num_tasks,       \
                                  int64_t P, bool theta_per_task, bool grad_per_task,             \
                                  const T* lr, const int64_t* segments, int64_t num_lr,           \
                                  LrMode mode, cudaStream_t stream) {                             \
    return inner_update_impl<T>(out, theta, grad, num_tasks, P, theta_per_task, grad_per_task,    \
                                lr, segments, num_lr, mode, stream);                              \
  }                                                                                               \
  cudaError_t launch_scale(T* out, const T* v, int64_t num_tasks, int64_t P, const T* lr,         \
                           const int64_t* segments, int64_t num_lr, LrMode mode,                  \
                           cudaStream_t stream) {                                                 \
    return scale_impl<T>(out, v, num_tasks, P, lr, segments, num_lr, mode, stream);               \
  }                                                                                               \
  cudaError_t launch_segment_dot(T* out, const T* a, const T* b, int64_t num_tasks, int64_t P,    \
                                 const int64_t* segments, int64_t num_out, LrMode mode,           \
                                 acc_t<T>* workspace, cudaStream_t stream) {                      \
    return segment_dot_impl<T>(out, a, b, num_tasks, P, segments, num_out, mode, workspace,       \
                               stream);                                                           \
  }                                                                                               \
  cudaError_t launch_reverse_step(T* out, T* d_lr, const T* v, const T* hv, const T* g,           \
                                  const T* gq, double w, int64_t num_tasks, int64_t P,            \
                                  const int64_t* segments, int64_t num_out, LrMode mode,          \
                                  acc_t<T>* workspace, cudaStream_t stream) {                     \
    return reverse_step_impl<T>(out, d_lr, v, hv, g, gq, w, num_tasks, P, segments, num_out,      \
                                mode, workspace, stream);                                         \
  }

FASTMAML_DEFINE_LAUNCHERS(float)
FASTMAML_DEFINE_LAUNCHERS(double)
FASTMAML_DEFINE_LAUNCHERS(__half)
FASTMAML_DEFINE_LAUNCHERS(__nv_bfloat16)

#undef FASTMAML_DEFINE_LAUNCHERS

}  // namespace cuda
}  // namespace fastmaml

// CUDA kernels of the trajectory-matching distance. The per-element arithmetic is distance.h's,
// shared with the CPU launcher in ops.cpp; this file adds only the GPU reduction scheme.
//
// Forward: block b reduces elements [b*kCudaChunk, (b+1)*kCudaChunk) in double (thread-strided, then
// a shared-memory tree), writes its two partial sums, and one finishing block sums the partials in a
// fixed order. No atomics, so the result is bit-reproducible run to run.
#include <cuda_runtime.h>

#include "distance.h"
#include "distance_cuda.h"

namespace datm_fast {
namespace {

constexpr int kThreads = 256;
// 2048 elements per block: 1M parameters give 512 blocks, about 4 waves over an H100's 132 SMs,
// enough to keep the loads in flight (the op reads 12 bytes per element and is bandwidth-bound).
constexpr int64_t kCudaChunk = 2048;

__device__ __forceinline__ void block_reduce_pair(double& a, double& b) {
  __shared__ double sa[kThreads];
  __shared__ double sb[kThreads];
  sa[threadIdx.x] = a;
  sb[threadIdx.x] = b;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      sa[threadIdx.x] += sa[threadIdx.x + stride];
      sb[threadIdx.x] += sb[threadIdx.x + stride];
    }
    __syncthreads();
  }
  a = sa[0];
  b = sb[0];
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    param_distance_partial_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ start,
                                  const scalar_t* __restrict__ target, int64_t n, double* __restrict__ partials) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kCudaChunk;
  const int64_t end = begin + kCudaChunk < n ? begin + kCudaChunk : n;
  double num = 0.0, den = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) distance_accumulate(student[i], start[i], target[i], num, den);
  block_reduce_pair(num, den);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = num;
    partials[2 * blockIdx.x + 1] = den;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    param_distance_finish_kernel(const double* __restrict__ partials, int64_t num_chunks, scalar_t* __restrict__ out_num,
                                 scalar_t* __restrict__ out_den) {
  double num = 0.0, den = 0.0;
  for (int64_t c = threadIdx.x; c < num_chunks; c += kThreads) {
    num += partials[2 * c];
    den += partials[2 * c + 1];
  }
  block_reduce_pair(num, den);
  if (threadIdx.x == 0) {
    // A float64 sum beyond float32's range rounds to inf here (as PyTorch's float32 sum gives inf),
    // nan stays nan: no host-side conversion, so nothing range-checks and throws.
    *out_num = static_cast<scalar_t>(num);
    *out_den = static_cast<scalar_t>(den);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    param_distance_backward_kernel(const scalar_t* __restrict__ grad_num, const scalar_t* __restrict__ grad_den,
                                   const scalar_t* __restrict__ student, const scalar_t* __restrict__ start,
                                   const scalar_t* __restrict__ target, int64_t n, scalar_t* __restrict__ grad_student,
                                   scalar_t* __restrict__ grad_start, scalar_t* __restrict__ grad_target) {
  const double g_num = static_cast<double>(*grad_num);
  const double g_den = static_cast<double>(*grad_den);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    distance_backward_element(student[i], start[i], target[i], g_num, g_den, grad_student[i], grad_start[i],
                              grad_target[i]);
  }
}

int64_t num_chunks_for(int64_t n) { return (n + kCudaChunk - 1) / kCudaChunk; }

}  // namespace

int64_t param_distance_workspace_size(int64_t n) { return 2 * (num_chunks_for(n) > 0 ? num_chunks_for(n) : 1); }

template <typename scalar_t>
cudaError_t param_distance_forward_cuda(const scalar_t* student, const scalar_t* start, const scalar_t* target,
                                        int64_t n, double* workspace, scalar_t* out_num, scalar_t* out_den,
                                        cudaStream_t stream) {
  const int64_t num_chunks = num_chunks_for(n);
  if (num_chunks > 0) {
    param_distance_partial_kernel<scalar_t>
        <<<static_cast<unsigned int>(num_chunks), kThreads, 0, stream>>>(student, start, target, n, workspace);
  }
  param_distance_finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(workspace, num_chunks, out_num, out_den);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t param_distance_backward_cuda(const scalar_t* grad_num, const scalar_t* grad_den, const scalar_t* student,
                                         const scalar_t* start, const scalar_t* target, int64_t n,
                                         scalar_t* grad_student, scalar_t* grad_start, scalar_t* grad_target,
                                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  // Grid-stride loop: at most 4096 blocks of 256 threads, each thread handling >= 1 element.
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const unsigned int blocks = static_cast<unsigned int>(wanted < 4096 ? wanted : 4096);
  param_distance_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
      grad_num, grad_den, student, start, target, n, grad_student, grad_start, grad_target);
  return cudaGetLastError();
}

template cudaError_t param_distance_forward_cuda<float>(const float*, const float*, const float*, int64_t, double*,
                                                        float*, float*, cudaStream_t);
template cudaError_t param_distance_forward_cuda<double>(const double*, const double*, const double*, int64_t,
                                                         double*, double*, double*, cudaStream_t);
template cudaError_t param_distance_backward_cuda<float>(const float*, const float*, const float*, const float*,
                                                         const float*, int64_t, float*, float*, float*,
                                                         cudaStream_t);
template cudaError_t param_distance_backward_cuda<double>(const double*, const double*, const double*,
                                                          const double*, const double*, int64_t, double*, double*,
                                                          double*, cudaStream_t);

}  // namespace datm_fast

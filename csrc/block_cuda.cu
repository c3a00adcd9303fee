// CUDA kernels of the fused ConvNet block epilogue. The arithmetic is block.h's, shared with the CPU
// launchers in block_cpu.cpp; this file adds only the GPU work split: one thread block per
// (sample, channel) plane, threads striding over its elements, plane sums by a shared-memory tree
// (fixed order: bit-reproducible run to run, no atomics).
#include <cuda_runtime.h>

#include "block.h"
#include "block_cuda.h"

namespace datm_fast {
namespace {

constexpr int kThreads = 256;

// Sums N values of every thread of the block; every thread gets the totals.
template <typename T, int N>
__device__ __forceinline__ void block_sum(T (&v)[N]) {
  __shared__ __align__(sizeof(double)) unsigned char raw[N * kThreads * sizeof(double)];
  T* sm = reinterpret_cast<T*>(raw);
#pragma unroll
  for (int n = 0; n < N; ++n) sm[n * kThreads + threadIdx.x] = v[n];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
#pragma unroll
      for (int n = 0; n < N; ++n) sm[n * kThreads + threadIdx.x] += sm[n * kThreads + threadIdx.x + stride];
    }
    __syncthreads();
  }
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = sm[n * kThreads];
  __syncthreads();  // the buffer is reused by the next call
}

template <typename T>
__device__ __forceinline__ BlockPlane<T> load_plane(const T* mean, const T* rstd, const T* gamma, const T* beta,
                                                    int64_t plane, int64_t C) {
  return {mean[plane], rstd[plane], gamma[plane % C], beta[plane % C]};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_forward_kernel(const T* __restrict__ z, const T* __restrict__ gamma, const T* __restrict__ beta, int64_t C,
                         int64_t H, int64_t W, T eps, T* __restrict__ out, T* __restrict__ mean_out,
                         T* __restrict__ rstd_out) {
  const int64_t plane = blockIdx.x, M = H * W, Ho = H / 2, Wo = W / 2;
  const T* x = z + plane * M;
  T acc[1] = {T(0)};
  for (int64_t k = threadIdx.x; k < M; k += kThreads) acc[0] += x[k];
  block_sum(acc);
  const T mu = acc[0] / static_cast<T>(M);
  acc[0] = T(0);
  for (int64_t k = threadIdx.x; k < M; k += kThreads) acc[0] += (x[k] - mu) * (x[k] - mu);
  block_sum(acc);
  const T r = T(1) / sqrt(acc[0] / static_cast<T>(M) + eps);
  if (threadIdx.x == 0) {
    mean_out[plane] = mu;
    rstd_out[plane] = r;
  }
  const BlockPlane<T> p{mu, r, gamma[plane % C], beta[plane % C]};
  T* o = out + plane * Ho * Wo;
  for (int64_t q = threadIdx.x; q < Ho * Wo; q += kThreads) {
    const int64_t i = q / Wo, j = q % Wo;
    const T* r0 = x + 2 * i * W + 2 * j;
    const T* r1 = r0 + W;
    o[q] = T(0.25) * (block_activation(block_xhat(r0[0], p), p) + block_activation(block_xhat(r0[1], p), p) +
                      block_activation(block_xhat(r1[0], p), p) + block_activation(block_xhat(r1[1], p), p));
  }
}

// gn of element k of a plane (zero outside the pooling windows).
template <typename T>
__device__ __forceinline__ T element_gn(int64_t k, T xhat, const T* g, int64_t W, int64_t Ho, int64_t Wo,
                                        const BlockPlane<T>& p) {
  const int64_t i = k / W, j = k % W;
  return (i < 2 * Ho && j < 2 * Wo) ? block_gn(xhat, g[(i / 2) * Wo + j / 2], p) : T(0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ z, const T* __restrict__ gamma,
                          const T* __restrict__ beta, const T* __restrict__ mean, const T* __restrict__ rstd,
                          int64_t C, int64_t H, int64_t W, T* __restrict__ dz, T* __restrict__ sum_gn,
                          T* __restrict__ sum_gn_xhat) {
  const int64_t plane = blockIdx.x, M = H * W, Ho = H / 2, Wo = W / 2;
  const BlockPlane<T> p = load_plane(mean, rstd, gamma, beta, plane, C);
  const T* x = z + plane * M;
  const T* g = grad_out + plane * Ho * Wo;
  T* d = dz + plane * M;
  T acc[2] = {T(0), T(0)};
  for (int64_t k = threadIdx.x; k < M; k += kThreads) {
    const T xh = block_xhat(x[k], p);
    const T gn = element_gn(k, xh, g, W, Ho, Wo, p);
    d[k] = gn;  // re-read below by this same thread
    acc[0] += gn;
    acc[1] += gn * xh;
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
    sum_gn[plane] = acc[0];
    sum_gn_xhat[plane] = acc[1];
  }
  const T m1 = acc[0] / static_cast<T>(M), m2 = acc[1] / static_cast<T>(M);
  for (int64_t k = threadIdx.x; k < M; k += kThreads) d[k] = block_grad_z(d[k], block_xhat(x[k], p), p, m1, m2);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_double_backward_kernel(const T* __restrict__ u, const T* __restrict__ u_gamma,
                                 const T* __restrict__ u_beta, const T* __restrict__ grad_out,
                                 const T* __restrict__ z, const T* __restrict__ gamma, const T* __restrict__ beta,
                                 const T* __restrict__ mean, const T* __restrict__ rstd, int64_t C, int64_t H,
                                 int64_t W, T* __restrict__ d_grad_out, T* __restrict__ d_z,
                                 T* __restrict__ d_gamma) {
  const int64_t plane = blockIdx.x, M = H * W, Ho = H / 2, Wo = W / 2;
  const BlockPlane<T> p = load_plane(mean, rstd, gamma, beta, plane, C);
  const T* x = z + plane * M;
  const T* uu = u + plane * M;
  const T* g = grad_out + plane * Ho * Wo;
  T* dzl = d_z + plane * M;
  T acc[5] = {T(0), T(0), T(0), T(0), T(0)};
  for (int64_t k = threadIdx.x; k < M; k += kThreads) {
    const T xh = block_xhat(x[k], p);
    const T gn = element_gn(k, xh, g, W, Ho, Wo, p);
    dzl[k] = gn;  // re-read below by this same thread
    acc[0] += gn;
    acc[1] += gn * xh;
    acc[2] += uu[k];
    acc[3] += uu[k] * xh;
    acc[4] += uu[k] * gn;
  }
  block_sum(acc);
  const T ug = u_gamma[plane], ub = u_beta[plane];
  const BlockDoubleBackwardSums<T> sums{acc[0], acc[1], acc[2], acc[3], acc[4]};
  const BlockDoubleBackwardPlane<T> q = block_double_backward_plane(sums, M, p, ug);
  if (threadIdx.x == 0) d_gamma[plane] = q.d_gamma;
  T ga_adj, z_adj;
  for (int64_t k = threadIdx.x; k < M; k += kThreads) {
    block_double_backward_element(uu[k], block_xhat(x[k], p), dzl[k], p, q, ug, ub, ga_adj, z_adj);
    dzl[k] = z_adj;
  }
  // The pooled gradient's adjoint: the window sums of ga_adj / 4 (ga_adj does not depend on gn).
  T* dg = d_grad_out + plane * Ho * Wo;
  for (int64_t o = threadIdx.x; o < Ho * Wo; o += kThreads) {
    const int64_t k0 = 2 * (o / Wo) * W + 2 * (o % Wo);
    const int64_t ks[4] = {k0, k0 + 1, k0 + W, k0 + W + 1};
    T total = T(0);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      block_double_backward_element(uu[ks[n]], block_xhat(x[ks[n]], p), T(0), p, q, ug, ub, ga_adj, z_adj);
      total += ga_adj;
    }
    dg[o] = T(0.25) * total;
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t block_forward_cuda(const scalar_t* z, const scalar_t* gamma, const scalar_t* beta, int64_t B, int64_t C,
                               int64_t H, int64_t W, double eps, scalar_t* out, scalar_t* mean, scalar_t* rstd,
                               cudaStream_t stream) {
  if (B * C == 0) return cudaSuccess;
  block_forward_kernel<scalar_t><<<static_cast<unsigned int>(B * C), kThreads, 0, stream>>>(
      z, gamma, beta, C, H, W, static_cast<scalar_t>(eps), out, mean, rstd);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t block_backward_cuda(const scalar_t* grad_out, const scalar_t* z, const scalar_t* gamma,
                                const scalar_t* beta, const scalar_t* mean, const scalar_t* rstd, int64_t B, int64_t C,
                                int64_t H, int64_t W, scalar_t* dz, scalar_t* sum_gn, scalar_t* sum_gn_xhat,
                                cudaStream_t stream) {
  if (B * C == 0) return cudaSuccess;
  block_backward_kernel<scalar_t><<<static_cast<unsigned int>(B * C), kThreads, 0, stream>>>(
      grad_out, z, gamma, beta, mean, rstd, C, H, W, dz, sum_gn, sum_gn_xhat);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t block_double_backward_cuda(const scalar_t* u, const scalar_t* u_gamma, const scalar_t* u_beta,
                                       const scalar_t* grad_out, const scalar_t* z, const scalar_t* gamma,
                                       const scalar_t* beta, const scalar_t* mean, const scalar_t* rstd, int64_t B,
                                       int64_t C, int64_t H, int64_t W, scalar_t* d_grad_out, scalar_t* d_z,
                                       scalar_t* d_gamma, cudaStream_t stream) {
  if (B * C == 0) return cudaSuccess;
  block_double_backward_kernel<scalar_t><<<static_cast<unsigned int>(B * C), kThreads, 0, stream>>>(
      u, u_gamma, u_beta, grad_out, z, gamma, beta, mean, rstd, C, H, W, d_grad_out, d_z, d_gamma);
  return cudaGetLastError();
}

#define DATM_INSTANTIATE_BLOCK(T)                                                                                   \
  template cudaError_t block_forward_cuda<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,       \
                                             double, T*, T*, T*, cudaStream_t);                                      \
  template cudaError_t block_backward_cuda<T>(const T*, const T*, const T*, const T*, const T*, const T*, int64_t,   \
                                              int64_t, int64_t, int64_t, T*, T*, T*, cudaStream_t);                  \
  template cudaError_t block_double_backward_cuda<T>(const T*, const T*, const T*, const T*, const T*, const T*,     \
                                                     const T*, const T*, const T*, int64_t, int64_t, int64_t,        \
                                                     int64_t, T*, T*, T*, cudaStream_t);
DATM_INSTANTIATE_BLOCK(float)
DATM_INSTANTIATE_BLOCK(double)
#undef DATM_INSTANTIATE_BLOCK

}  // namespace datm_fast

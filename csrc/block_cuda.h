// Launchers of the CUDA kernels of the fused ConvNet block epilogue (instance norm -> ReLU -> 2x2
// average pool): plain CUDA over raw NCHW-contiguous pointers and a stream, no torch headers, so nvcc
// compiles them on any machine with the CUDA toolkit (CI included). Shapes: z (B, C, H, W), pooled
// (B, C, H/2, W/2), per-plane statistics (B, C), gamma / beta (C).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace datm_fast {

template <typename scalar_t>
cudaError_t block_forward_cuda(const scalar_t* z, const scalar_t* gamma, const scalar_t* beta, int64_t B, int64_t C,
                               int64_t H, int64_t W, double eps, scalar_t* out, scalar_t* mean, scalar_t* rstd,
                               cudaStream_t stream);

template <typename scalar_t>
cudaError_t block_backward_cuda(const scalar_t* grad_out, const scalar_t* z, const scalar_t* gamma,
                                const scalar_t* beta, const scalar_t* mean, const scalar_t* rstd, int64_t B, int64_t C,
                                int64_t H, int64_t W, scalar_t* dz, scalar_t* sum_gn, scalar_t* sum_gn_xhat,
                                cudaStream_t stream);

template <typename scalar_t>
cudaError_t block_double_backward_cuda(const scalar_t* u, const scalar_t* u_gamma, const scalar_t* u_beta,
                                       const scalar_t* grad_out, const scalar_t* z, const scalar_t* gamma,
                                       const scalar_t* beta, const scalar_t* mean, const scalar_t* rstd, int64_t B,
                                       int64_t C, int64_t H, int64_t W, scalar_t* d_grad_out, scalar_t* d_z,
                                       scalar_t* d_gamma, cudaStream_t stream);

}  // namespace datm_fast

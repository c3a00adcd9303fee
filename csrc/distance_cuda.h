// Launchers of the CUDA distance kernels: plain CUDA over raw pointers and a stream, no torch
// headers, so nvcc compiles them on any machine with the CUDA toolkit (CI included).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace datm_fast {

// Number of doubles the caller must provide as workspace for param_distance_forward_cuda.
int64_t param_distance_workspace_size(int64_t n);

// *out_num = ||student - target||^2, *out_den = ||start - target||^2 (device scalars).
// workspace: param_distance_workspace_size(n) doubles of device memory. Deterministic: no atomics.
template <typename scalar_t>
cudaError_t param_distance_forward_cuda(const scalar_t* student, const scalar_t* start, const scalar_t* target,
                                        int64_t n, double* workspace, scalar_t* out_num, scalar_t* out_den,
                                        cudaStream_t stream);

// grad_num and grad_den are device scalars (no host synchronisation to read them).
template <typename scalar_t>
cudaError_t param_distance_backward_cuda(const scalar_t* grad_num, const scalar_t* grad_den, const scalar_t* student,
                                         const scalar_t* start, const scalar_t* target, int64_t n,
                                         scalar_t* grad_student, scalar_t* grad_start, scalar_t* grad_target,
                                         cudaStream_t stream);

}  // namespace datm_fast

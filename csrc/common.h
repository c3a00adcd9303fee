// Shared by the CPU (C++/OpenMP) and CUDA launchers: the arithmetic of every kernel is written once,
// as __host__ __device__ inline functions, so the CPU tests exercise exactly the code the GPU runs.
// This header must stay free of torch headers: the .cu files include it and are compiled by nvcc
// against the plain CUDA runtime (the CPU build of torch lacks the generated CUDA headers).
#pragma once

#if defined(__CUDACC__)
#define DATM_HD __host__ __device__ __forceinline__
#else
#define DATM_HD inline
#endif

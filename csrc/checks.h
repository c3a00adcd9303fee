// Input checks of the datm_fast operators, shared by the CPU launchers (ops.cpp, block_cpu.cpp) and the
// CUDA binding (cuda_binding.cpp), so that every backend rejects the same inputs with the same message.
// ATen-side: unlike common.h, this header includes torch and is never seen by nvcc.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace datm_fast {

// ----- param_distance: three flat parameter vectors ------------------------------------------------------
inline void check_distance_inputs(const char* op, const at::Tensor& student, const at::Tensor& start,
                                  const at::Tensor& target) {
  TORCH_CHECK(student.dim() == 1, op, ": student must be a flat 1-D parameter vector, got shape ", student.sizes());
  TORCH_CHECK(start.sizes() == student.sizes() && target.sizes() == student.sizes(), op,
              ": student, start and target must have the same shape, got ", student.sizes(), ", ", start.sizes(),
              " and ", target.sizes());
  TORCH_CHECK(start.scalar_type() == student.scalar_type() && target.scalar_type() == student.scalar_type(), op,
              ": student, start and target must share one dtype, got ", student.scalar_type(), ", ",
              start.scalar_type(), " and ", target.scalar_type());
  TORCH_CHECK(student.scalar_type() == at::kFloat || student.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 parameters, got ", student.scalar_type());
  TORCH_CHECK(start.device() == student.device() && target.device() == student.device(), op,
              ": student, start and target must be on one device, got ", student.device(), ", ", start.device(),
              " and ", target.device());
}

// ----- norm_relu_pool: a (B, C, H, W) conv output and its (C,) affine parameters ---------------------------
struct BlockShape {
  int64_t B, C, H, W, Ho, Wo;  // Ho, Wo: after the 2x2 pooling (floor)
  int64_t planes() const { return B * C; }
  int64_t M() const { return H * W; }
  int64_t Mo() const { return Ho * Wo; }
};

inline BlockShape check_block_inputs(const char* op, const at::Tensor& z, const at::Tensor& gamma,
                                     const at::Tensor& beta) {
  TORCH_CHECK(z.dim() == 4, op, ": z must be (B, C, H, W), got shape ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op,
              ": expected float32 or float64, got ", z.scalar_type());
  const int64_t C = z.size(1);
  TORCH_CHECK(z.size(2) >= 2 && z.size(3) >= 2, op, ": H and W must be at least 2 for 2x2 pooling, got ", z.sizes());
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == C && beta.dim() == 1 && beta.size(0) == C, op,
              ": gamma and beta must have shape (", C, "), got ", gamma.sizes(), " and ", beta.sizes());
  TORCH_CHECK(gamma.scalar_type() == z.scalar_type() && beta.scalar_type() == z.scalar_type(), op,
              ": gamma and beta must have z's dtype ", z.scalar_type());
  TORCH_CHECK(gamma.device() == z.device() && beta.device() == z.device(), op, ": tensors must be on one device");
  return {z.size(0), C, z.size(2), z.size(3), z.size(2) / 2, z.size(3) / 2};
}

// Another input of a block operator (grad_out, mean, rstd, adjoints): the given shape, z's dtype and device.
inline void check_block_like(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                             const at::Tensor& z) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == z.scalar_type() && t.device() == z.device(), op, ": ", name,
              " must have z's dtype and device");
}

}  // namespace datm_fast

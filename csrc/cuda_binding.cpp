// CUDA implementations of the datm_fast operators: a thin binding from torch tensors to the plain
// CUDA launchers in *_cuda.cu. Compiled only against a CUDA build of torch (setup.py decides).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "block_cuda.h"
#include "checks.h"
#include "distance_cuda.h"

namespace datm_fast {
namespace {

#define DATM_CHECK_CUDA_CALL(expr)                                                        \
  do {                                                                                    \
    const cudaError_t err_ = (expr);                                                      \
    TORCH_CHECK(err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(err_));        \
  } while (0)

void check_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> param_distance_cuda(const at::Tensor& student_in, const at::Tensor& start_in,
                                                       const at::Tensor& target_in) {
  check_distance_inputs("param_distance", student_in, start_in, target_in);
  check_cuda("param_distance", student_in);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous(), start = start_in.contiguous(), target = target_in.contiguous();
  const int64_t n = student.numel();
  at::Tensor workspace = at::empty({param_distance_workspace_size(n)}, student.options().dtype(at::kDouble));
  at::Tensor num = at::empty({}, student.options());
  at::Tensor den = at::empty({}, student.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "param_distance_cuda", [&] {
    DATM_CHECK_CUDA_CALL(param_distance_forward_cuda<scalar_t>(
        student.data_ptr<scalar_t>(), start.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), n,
        workspace.data_ptr<double>(), num.data_ptr<scalar_t>(), den.data_ptr<scalar_t>(), stream));
  });
  return {num, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> param_distance_backward_cuda_impl(const at::Tensor& grad_num,
                                                                                 const at::Tensor& grad_den,
                                                                                 const at::Tensor& student_in,
                                                                                 const at::Tensor& start_in,
                                                                                 const at::Tensor& target_in) {
  check_distance_inputs("param_distance_backward", student_in, start_in, target_in);
  check_cuda("param_distance_backward", student_in);
  TORCH_CHECK(grad_num.numel() == 1 && grad_den.numel() == 1,
              "param_distance_backward: grad_num and grad_den must be scalars");
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous(), start = start_in.contiguous(), target = target_in.contiguous();
  const at::Tensor g_num = grad_num.to(student.options()).contiguous();
  const at::Tensor g_den = grad_den.to(student.options()).contiguous();
  at::Tensor grad_student = at::empty_like(student);
  at::Tensor grad_start = at::empty_like(student);
  at::Tensor grad_target = at::empty_like(student);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "param_distance_backward_cuda", [&] {
    DATM_CHECK_CUDA_CALL(param_distance_backward_cuda<scalar_t>(
        g_num.data_ptr<scalar_t>(), g_den.data_ptr<scalar_t>(), student.data_ptr<scalar_t>(),
        start.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), student.numel(), grad_student.data_ptr<scalar_t>(),
        grad_start.data_ptr<scalar_t>(), grad_target.data_ptr<scalar_t>(), stream));
  });
  return {grad_student, grad_start, grad_target};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_forward_cuda_impl(const at::Tensor& z_in,
                                                                       const at::Tensor& gamma_in,
                                                                       const at::Tensor& beta_in, double eps) {
  check_block_inputs("block_forward", z_in, gamma_in, beta_in);
  check_cuda("block_forward", z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous(), gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  const int64_t B = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3);
  at::Tensor out = at::empty({B, C, H / 2, W / 2}, z.options());
  at::Tensor mean = at::empty({B, C}, z.options());
  at::Tensor rstd = at::empty({B, C}, z.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "block_forward_cuda", [&] {
    DATM_CHECK_CUDA_CALL(block_forward_cuda<scalar_t>(z.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
                                                      beta.data_ptr<scalar_t>(), B, C, H, W, eps,
                                                      out.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                                                      rstd.data_ptr<scalar_t>(), stream));
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_backward_cuda_impl(const at::Tensor& gp_in,
                                                                        const at::Tensor& z_in,
                                                                        const at::Tensor& gamma_in,
                                                                        const at::Tensor& beta_in,
                                                                        const at::Tensor& mean_in,
                                                                        const at::Tensor& rstd_in) {
  check_block_inputs("block_backward", z_in, gamma_in, beta_in);
  check_cuda("block_backward", z_in);
  const int64_t B = z_in.size(0), C = z_in.size(1), H = z_in.size(2), W = z_in.size(3);
  check_block_like("block_backward", "grad_out", gp_in, {B, C, H / 2, W / 2}, z_in);
  check_block_like("block_backward", "mean", mean_in, {B, C}, z_in);
  check_block_like("block_backward", "rstd", rstd_in, {B, C}, z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor gp = gp_in.contiguous(), z = z_in.contiguous(), gamma = gamma_in.contiguous(),
                   beta = beta_in.contiguous(), mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor dz = at::empty_like(z);
  at::Tensor sum_gn = at::empty({B, C}, z.options());
  at::Tensor sum_gn_xhat = at::empty({B, C}, z.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "block_backward_cuda", [&] {
    DATM_CHECK_CUDA_CALL(block_backward_cuda<scalar_t>(
        gp.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
        mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), B, C, H, W, dz.data_ptr<scalar_t>(),
        sum_gn.data_ptr<scalar_t>(), sum_gn_xhat.data_ptr<scalar_t>(), stream));
  });
  return {dz, sum_gn, sum_gn_xhat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_double_backward_cuda_impl(
    const at::Tensor& u_in, const at::Tensor& u_gamma_in, const at::Tensor& u_beta_in, const at::Tensor& gp_in,
    const at::Tensor& z_in, const at::Tensor& gamma_in, const at::Tensor& beta_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in) {
  check_block_inputs("block_double_backward", z_in, gamma_in, beta_in);
  check_cuda("block_double_backward", z_in);
  const int64_t B = z_in.size(0), C = z_in.size(1), H = z_in.size(2), W = z_in.size(3);
  check_block_like("block_double_backward", "u", u_in, z_in.sizes(), z_in);
  check_block_like("block_double_backward", "u_gamma", u_gamma_in, {B, C}, z_in);
  check_block_like("block_double_backward", "u_beta", u_beta_in, {B, C}, z_in);
  check_block_like("block_double_backward", "grad_out", gp_in, {B, C, H / 2, W / 2}, z_in);
  check_block_like("block_double_backward", "mean", mean_in, {B, C}, z_in);
  check_block_like("block_double_backward", "rstd", rstd_in, {B, C}, z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor u = u_in.contiguous(), ug = u_gamma_in.contiguous(), ub = u_beta_in.contiguous(),
                   gp = gp_in.contiguous(), z = z_in.contiguous(), gamma = gamma_in.contiguous(),
                   beta = beta_in.contiguous(), mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor d_gp = at::empty_like(gp);
  at::Tensor d_z = at::empty_like(z);
  at::Tensor d_gamma = at::empty({B, C}, z.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "block_double_backward_cuda", [&] {
    DATM_CHECK_CUDA_CALL(block_double_backward_cuda<scalar_t>(
        u.data_ptr<scalar_t>(), ug.data_ptr<scalar_t>(), ub.data_ptr<scalar_t>(), gp.data_ptr<scalar_t>(),
        z.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
        rstd.data_ptr<scalar_t>(), B, C, H, W, d_gp.data_ptr<scalar_t>(), d_z.data_ptr<scalar_t>(),
        d_gamma.data_ptr<scalar_t>(), stream));
  });
  return {d_gp, d_z, d_gamma};
}

}  // namespace
}  // namespace datm_fast

TORCH_LIBRARY_IMPL(datm_fast, CUDA, m) {
  m.impl("param_distance", &datm_fast::param_distance_cuda);
  m.impl("param_distance_backward", &datm_fast::param_distance_backward_cuda_impl);
  m.impl("block_forward", &datm_fast::block_forward_cuda_impl);
  m.impl("block_backward", &datm_fast::block_backward_cuda_impl);
  m.impl("block_double_backward", &datm_fast::block_double_backward_cuda_impl);
}

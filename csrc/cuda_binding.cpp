// CUDA implementations of the datm_fast operators: a thin binding from torch tensors to the plain
// CUDA launchers in *_cuda.cu. Compiled only against a CUDA build of torch (setup.py decides).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "distance_cuda.h"

namespace datm_fast {
namespace {

#define DATM_CHECK_CUDA_CALL(expr)                                                        \
  do {                                                                                    \
    const cudaError_t err_ = (expr);                                                      \
    TORCH_CHECK(err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(err_));        \
  } while (0)

void check_cuda_inputs(const char* op, const at::Tensor& student, const at::Tensor& start, const at::Tensor& target) {
  TORCH_CHECK(student.is_cuda() && start.is_cuda() && target.is_cuda(), op, ": expected CUDA tensors");
  TORCH_CHECK(student.dim() == 1, op, ": student must be a flat 1-D parameter vector, got shape ", student.sizes());
  TORCH_CHECK(start.sizes() == student.sizes() && target.sizes() == student.sizes(), op,
              ": student, start and target must have the same shape, got ", student.sizes(), ", ", start.sizes(),
              " and ", target.sizes());
  TORCH_CHECK(start.scalar_type() == student.scalar_type() && target.scalar_type() == student.scalar_type(), op,
              ": student, start and target must share one dtype");
  TORCH_CHECK(student.scalar_type() == at::kFloat || student.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 parameters, got ", student.scalar_type());
  TORCH_CHECK(start.device() == student.device() && target.device() == student.device(), op,
              ": student, start and target must be on one device");
}

std::tuple<at::Tensor, at::Tensor> param_distance_cuda(const at::Tensor& student_in, const at::Tensor& start_in,
                                                       const at::Tensor& target_in) {
  check_cuda_inputs("param_distance", student_in, start_in, target_in);
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
  check_cuda_inputs("param_distance_backward", student_in, start_in, target_in);
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

}  // namespace
}  // namespace datm_fast

TORCH_LIBRARY_IMPL(datm_fast, CUDA, m) {
  m.impl("param_distance", &datm_fast::param_distance_cuda);
  m.impl("param_distance_backward", &datm_fast::param_distance_backward_cuda_impl);
}

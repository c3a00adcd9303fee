// The datm_fast operator library: schemas (TORCH_LIBRARY), the CPU implementations, and the Python
// module init of datm_fast._C. The CUDA implementations live in cuda_binding.cpp + *_cuda.cu and are
// compiled only against a CUDA build of torch.
//
// CPU launchers split the work into fixed chunks (kDistanceChunk elements) and run the chunks with
// at::parallel_for (OpenMP in torch's builds); the per-element arithmetic comes from distance.h,
// the same functions the CUDA kernels call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "distance.h"

namespace datm_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> param_distance_cpu(const at::Tensor& student_in, const at::Tensor& start_in,
                                                      const at::Tensor& target_in) {
  check_distance_inputs("param_distance", student_in, start_in, target_in);
  TORCH_CHECK(student_in.device().is_cpu(), "param_distance_cpu: expected CPU tensors, got ", student_in.device());
  const at::Tensor student = student_in.contiguous(), start = start_in.contiguous(), target = target_in.contiguous();
  const int64_t n = student.numel();
  const int64_t num_chunks = (n + kDistanceChunk - 1) / kDistanceChunk;
  std::vector<double> partial_num(num_chunks, 0.0), partial_den(num_chunks, 0.0);
  at::Tensor num = at::empty({}, student.options());
  at::Tensor den = at::empty({}, student.options());
  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "param_distance_cpu", [&] {
    const scalar_t* s = student.data_ptr<scalar_t>();
    const scalar_t* a = start.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        const int64_t begin = c * kDistanceChunk;
        const int64_t end = std::min(begin + kDistanceChunk, n);
        distance_chunk(s, a, t, begin, end, partial_num[c], partial_den[c]);
      }
    });
    // Chunks are summed in index order: the result is bit-identical for any number of threads.
    double total_num = 0.0, total_den = 0.0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      total_num += partial_num[c];
      total_den += partial_den[c];
    }
    // Stored by a plain cast, not fill_(double): fill_ range-checks and throws when the float64 sum
    // exceeds float32's range, where PyTorch's float32 sum gives inf (and the training loop then
    // skips the non-finite step). The cast rounds to +inf (IEEE 754), nan stays nan.
    *num.data_ptr<scalar_t>() = static_cast<scalar_t>(total_num);
    *den.data_ptr<scalar_t>() = static_cast<scalar_t>(total_den);
  });
  return {num, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> param_distance_backward_cpu(const at::Tensor& grad_num,
                                                                           const at::Tensor& grad_den,
                                                                           const at::Tensor& student_in,
                                                                           const at::Tensor& start_in,
                                                                           const at::Tensor& target_in) {
  check_distance_inputs("param_distance_backward", student_in, start_in, target_in);
  TORCH_CHECK(grad_num.numel() == 1 && grad_den.numel() == 1,
              "param_distance_backward: grad_num and grad_den must be scalars, got shapes ", grad_num.sizes(),
              " and ", grad_den.sizes());
  const at::Tensor student = student_in.contiguous(), start = start_in.contiguous(), target = target_in.contiguous();
  const double g_num = grad_num.item<double>();
  const double g_den = grad_den.item<double>();
  at::Tensor grad_student = at::empty_like(student);
  at::Tensor grad_start = at::empty_like(student);
  at::Tensor grad_target = at::empty_like(student);
  const int64_t n = student.numel();
  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "param_distance_backward_cpu", [&] {
    const scalar_t* s = student.data_ptr<scalar_t>();
    const scalar_t* a = start.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    scalar_t* gs = grad_student.data_ptr<scalar_t>();
    scalar_t* ga = grad_start.data_ptr<scalar_t>();
    scalar_t* gt = grad_target.data_ptr<scalar_t>();
    at::parallel_for(0, n, kDistanceChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) distance_backward_element(s[i], a[i], t[i], g_num, g_den, gs[i], ga[i], gt[i]);
    });
  });
  return {grad_student, grad_start, grad_target};
}

}  // namespace
}  // namespace datm_fast

TORCH_LIBRARY(datm_fast, m) {
  m.def("param_distance(Tensor student, Tensor start, Tensor target) -> (Tensor, Tensor)");
  m.def(
      "param_distance_backward(Tensor grad_num, Tensor grad_den, Tensor student, Tensor start, Tensor target) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(datm_fast, CPU, m) {
  m.impl("param_distance", &datm_fast::param_distance_cpu);
  m.impl("param_distance_backward", &datm_fast::param_distance_backward_cpu);
}

#ifndef DATM_FAST_WITH_CUDA
#define DATM_FAST_WITH_CUDA 0
#endif

// datm_fast._C carries no Python functions: importing it registers the operators above with the
// dispatcher (torch.ops.datm_fast.*). Its two constants say how it was built.
static struct PyModuleDef datm_fast_module = {PyModuleDef_HEAD_INIT, "_C", "datm_fast compiled operators", -1,
                                              nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&datm_fast_module);
  if (module == nullptr) return nullptr;
  PyModule_AddIntConstant(module, "WITH_CUDA", DATM_FAST_WITH_CUDA);
#ifdef _OPENMP
  PyModule_AddIntConstant(module, "WITH_OPENMP", 1);
#else
  PyModule_AddIntConstant(module, "WITH_OPENMP", 0);
#endif
  return module;
}

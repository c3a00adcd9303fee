// Trajectory-matching distance: the arithmetic shared by the CPU and CUDA launchers.
//
//   num = ||student - target||^2      (student = theta_N, the unrolled student's final parameters)
//   den = ||start   - target||^2      (start   = theta_0, target = theta*, the expert's later epoch)
//
// Every element is widened to double before it is squared and summed: the vectors hold 0.3 to 1
// million float32 values, and a float32 running sum over 1e6 squares loses about 3 digits, which
// would show up directly in the loss ratio num / den that drives the whole optimisation.
#pragma once

#include <cstdint>

#include "common.h"

namespace datm_fast {

// Elements each CPU chunk / CUDA block reduces before its partial sum is written. Fixed (not tied
// to the thread count) so that the summation order, and hence the result bits, never depend on how
// many threads ran: 16384 doubles of work per chunk keeps the 2-core CPU loop at memory bandwidth.
constexpr int64_t kDistanceChunk = 16384;

template <typename scalar_t>
DATM_HD void distance_accumulate(scalar_t student, scalar_t start, scalar_t target, double& num, double& den) {
  const double dn = static_cast<double>(student) - static_cast<double>(target);
  const double dd = static_cast<double>(start) - static_cast<double>(target);
  num += dn * dn;
  den += dd * dd;
}

// d num / d student = 2 (student - target), d den / d start = 2 (start - target),
// d / d target = -(both); scaled by the incoming gradients of num and den. A float64 gradient
// beyond float32's range becomes inf in the cast (IEEE 754 rounding; the build has no fast-math).
template <typename scalar_t>
DATM_HD void distance_backward_element(scalar_t student, scalar_t start, scalar_t target, double grad_num,
                                       double grad_den, scalar_t& grad_student, scalar_t& grad_start,
                                       scalar_t& grad_target) {
  const double gs = 2.0 * grad_num * (static_cast<double>(student) - static_cast<double>(target));
  const double ga = 2.0 * grad_den * (static_cast<double>(start) - static_cast<double>(target));
  grad_student = static_cast<scalar_t>(gs);
  grad_start = static_cast<scalar_t>(ga);
  grad_target = static_cast<scalar_t>(-gs - ga);
}

// The partial sums of one chunk [begin, end): the same loop body on the CPU (one chunk per task) and
// on the GPU (one chunk per block, strided over threads) would differ in order; the CPU calls this,
// the CUDA kernel calls distance_accumulate directly in its strided loop.
template <typename scalar_t>
DATM_HD void distance_chunk(const scalar_t* student, const scalar_t* start, const scalar_t* target, int64_t begin,
                            int64_t end, double& num, double& den) {
  double n = 0.0, d = 0.0;
  for (int64_t i = begin; i < end; ++i) distance_accumulate(student[i], start[i], target[i], n, d);
  num = n;
  den = d;
}

}  // namespace datm_fast

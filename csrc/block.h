// ConvNet block epilogue, instance norm -> ReLU -> 2x2 average pool: the arithmetic shared by the CPU
// launchers (block_cpu.cpp) and the CUDA kernels (block_cuda.cu). The formulas and their derivation
// are in datm_fast/reference/block.py, which computes the same thing with PyTorch ops.
//
// Layout: NCHW contiguous; one (sample, channel) plane of M = H * W elements is the unit of work: its
// statistics are plane reductions, and every formula below is either per element or per plane.
// Elements of an odd last row / column lie outside every pooling window (avg_pool2d floors).
#pragma once

#include <cstdint>

#include "common.h"

namespace datm_fast {

// Float accumulates in float (vectorised CPU loops keep 16 partial sums; planes hold at most 4096
// elements), double in double.
template <typename T>
struct BlockPlane {
  T mean, rstd, gamma, beta;
};

// Each per-element function comes in two forms with one body: scalar arguments (what vectorised
// channel loops call: no struct to privatise per SIMD lane) and a BlockPlane.
template <typename T>
DATM_HD T block_xhat(T z, T mean, T rstd) {
  return (z - mean) * rstd;
}
template <typename T>
DATM_HD T block_xhat(T z, const BlockPlane<T>& p) {
  return block_xhat(z, p.mean, p.rstd);
}

// The ReLU mask is decided in one way everywhere (forward, backward, double backward), so that the
// three kernels agree on every element, including those whose normalised value rounds to zero.
template <typename T>
DATM_HD bool block_relu_on(T xhat, T gamma, T beta) {
  return gamma * xhat + beta > T(0);
}
template <typename T>
DATM_HD bool block_relu_on(T xhat, const BlockPlane<T>& p) {
  return block_relu_on(xhat, p.gamma, p.beta);
}

template <typename T>
DATM_HD T block_activation(T xhat, T gamma, T beta) {
  return block_relu_on(xhat, gamma, beta) ? gamma * xhat + beta : T(0);
}
template <typename T>
DATM_HD T block_activation(T xhat, const BlockPlane<T>& p) {
  return block_activation(xhat, p.gamma, p.beta);
}

// gn = [n > 0] * dL/dp / 4: the gradient that reaches the normalised value n of one element.
template <typename T>
DATM_HD T block_gn(T xhat, T grad_pooled, T gamma, T beta) {
  return block_relu_on(xhat, gamma, beta) ? T(0.25) * grad_pooled : T(0);
}
template <typename T>
DATM_HD T block_gn(T xhat, T grad_pooled, const BlockPlane<T>& p) {
  return block_gn(xhat, grad_pooled, p.gamma, p.beta);
}

// dz = gamma * r * (gn - mean(gn) - xhat * mean(gn * xhat)).
template <typename T>
DATM_HD T block_grad_z(T gn, T xhat, T gamma, T rstd, T mean_gn, T mean_gn_xhat) {
  return gamma * rstd * (gn - mean_gn - xhat * mean_gn_xhat);
}
template <typename T>
DATM_HD T block_grad_z(T gn, T xhat, const BlockPlane<T>& p, T mean_gn, T mean_gn_xhat) {
  return block_grad_z(gn, xhat, p.gamma, p.rstd, mean_gn, mean_gn_xhat);
}

// Double backward. Inputs per plane: the adjoints u (of dz, per element), u_gamma and u_beta (of the
// plane's sums sum(gn * xhat) and sum(gn), whose batch sums are dgamma and dbeta), and five plane sums
// of the first pass.
template <typename T>
struct BlockDoubleBackwardSums {
  T gn, gn_xhat, u, u_xhat, u_gn;
};

template <typename T>
struct BlockDoubleBackwardPlane {
  T U1, U2;            // mean(u), mean(u * xhat)
  T Bm;                // mean(ghat * xhat), ghat = gamma * gn
  T mean_v, mean_v_xhat;
  T rho_term;          // rho * r^2 / M, rho = sum(u * dz) / r (the adjoint of r)
  T d_gamma;           // sum(t * gn): this plane's share of the adjoint of gamma
};

template <typename T>
DATM_HD BlockDoubleBackwardPlane<T> block_double_backward_plane(const BlockDoubleBackwardSums<T>& s, int64_t M,
                                                                const BlockPlane<T>& p, T u_gamma) {
  const T inv_m = T(1) / static_cast<T>(M);
  const T r = p.rstd;
  BlockDoubleBackwardPlane<T> q;
  q.U1 = s.u * inv_m;
  q.U2 = s.u_xhat * inv_m;
  const T A = p.gamma * s.gn * inv_m;  // mean(ghat)
  q.Bm = p.gamma * s.gn_xhat * inv_m;
  // v = -r * (u * Bm + U2 * ghat) + u_gamma * gn, the adjoint of xhat; its two plane means:
  q.mean_v = -r * (q.Bm * q.U1 + q.U2 * A) + u_gamma * s.gn * inv_m;
  q.mean_v_xhat = T(-2) * r * q.Bm * q.U2 + u_gamma * s.gn_xhat * inv_m;
  const T rho = p.gamma * s.u_gn - static_cast<T>(M) * (A * q.U1 + q.Bm * q.U2);
  q.rho_term = rho * r * r * inv_m;
  q.d_gamma = r * (s.u_gn - q.U1 * s.gn - q.U2 * s.gn_xhat);
  return q;
}

// Per element: the adjoint of the pooled-gradient input before pooling (ga_adj; the caller sums the
// four of a window and divides by 4) and the adjoint of z.
template <typename T>
DATM_HD void block_double_backward_element(T u, T xhat, T gn, T gamma, T beta, T rstd, T U1, T U2, T Bm, T mean_v,
                                           T mean_v_xhat, T rho_term, T u_gamma, T u_beta, T& ga_adj, T& z_adj) {
  const T r = rstd;
  const T t = r * (u - U1 - xhat * U2);
  ga_adj = block_relu_on(xhat, gamma, beta) ? gamma * t + u_gamma * xhat + u_beta : T(0);
  const T v = -r * (u * Bm + U2 * gamma * gn) + u_gamma * gn;
  z_adj = r * (v - mean_v - xhat * mean_v_xhat) - rho_term * xhat;
}
template <typename T>
DATM_HD void block_double_backward_element(T u, T xhat, T gn, const BlockPlane<T>& p,
                                           const BlockDoubleBackwardPlane<T>& q, T u_gamma, T u_beta, T& ga_adj,
                                           T& z_adj) {
  block_double_backward_element(u, xhat, gn, p.gamma, p.beta, p.rstd, q.U1, q.U2, q.Bm, q.mean_v, q.mean_v_xhat,
                                q.rho_term, u_gamma, u_beta, ga_adj, z_adj);
}

}  // namespace datm_fast

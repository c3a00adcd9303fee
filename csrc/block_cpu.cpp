// CPU launchers of the fused ConvNet block epilogue (instance norm -> ReLU -> 2x2 average pool): forward,
// backward and double backward, plus the schemas of the three operators. The per-element and
// per-plane arithmetic is in block.h, shared with block_cuda.cu.
//
// Why fused: in the exact unroll engine (IPC 1, 80 steps) the elementwise ops of PyTorch's
// group-norm double backward and the pooling cost 39% of an iteration on the 2-core CPU (profile in
// benchmarks/NOTES.md); PyTorch makes a pass over the activation per op. Here one (sample, channel)
// plane (at most 32 x 32 floats = 4 KB for CIFAR) is the unit of work: its first pass reads it from
// memory, the following passes find it in L1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "block.h"
#include "checks.h"

namespace datm_fast {
namespace {

// Work per parallel task: at least ~16K elements, so that the 4x4 planes of the last block are not
// scheduled one by one.
int64_t plane_grain(const BlockShape& s) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.M())); }

// ----- plane kernels: one range of (sample, channel) planes, NCHW contiguous ---------------------------
// Compiled once per instruction set (AVX-512, AVX2 + FMA, baseline) and picked at load time (GCC
// function multi-versioning), so the portable wheel still runs the elementwise loops 16 floats wide
// where the CPU has AVX-512. Measured on the 2-core AVX-512 VM (2026-12-03, 2 threads, float32, batch
// 10, width 128): at 32 x 32 planes backward 0.52 ms and double backward 1.15 ms, against 3.58 and
// 7.40 ms for the same loops compiled for the baseline (SSE2); at 8 x 8 the baseline is a little
// faster (0.23 / 0.59 against 0.27 / 0.72 ms: rows of 8 fill half an AVX-512 vector), a small share
// of the time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DATM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DATM_CPU_CLONES
#endif
#define DATM_ALWAYS_INLINE inline __attribute__((always_inline))

template <typename T>
struct BlockArgs {
  BlockShape s;
  const T* z;
  const T* gamma;
  const T* beta;
  T* mean;  // written by the forward, read by the others
  T* rstd;
  const T* grad_out;  // (B, C, Ho, Wo)
  const T* u;         // double backward: adjoints of dz (per element) and of the per-plane sums
  const T* u_gamma;   // (B, C): adjoint of sum_gn_xhat, whose batch sum is dgamma
  const T* u_beta;    // (B, C): adjoint of sum_gn, whose batch sum is dbeta
  T* out;      // forward: pooled output; backward: dz; double backward: d_z
  T* out2;     // backward: sum_gn; double backward: d_grad_out
  T* out3;     // backward: sum_gn_xhat; double backward: d_gamma per plane
  T eps;
};

template <typename T>
DATM_ALWAYS_INLINE void forward_planes_impl(const BlockArgs<T>& a, int64_t p0, int64_t p1, T* row) {
  const BlockShape& s = a.s;
  const int64_t M = s.M(), W = s.W;
  for (int64_t pl = p0; pl < p1; ++pl) {
    const T* x = a.z + pl * M;
    // Two passes (mean, then squared deviations), as stable as aten's; the second reads from L1.
    T acc = 0;
    _Pragma("omp simd reduction(+ : acc)") for (int64_t k = 0; k < M; ++k) acc += x[k];
    const T mu = acc / static_cast<T>(M);
    acc = 0;
    _Pragma("omp simd reduction(+ : acc)") for (int64_t k = 0; k < M; ++k) acc += (x[k] - mu) * (x[k] - mu);
    const T r = T(1) / std::sqrt(acc / static_cast<T>(M) + a.eps);
    a.mean[pl] = mu;
    a.rstd[pl] = r;
    const BlockPlane<T> prm{mu, r, a.gamma[pl % s.C], a.beta[pl % s.C]};
    T* o = a.out + pl * s.Mo();
    for (int64_t i = 0; i < s.Ho; ++i) {
      // Activations of the window's two rows summed column by column (vectorised), then pairs of columns.
      const T* r0 = x + 2 * i * W;
      const T* r1 = r0 + W;
      const int64_t Wp = 2 * s.Wo;
      _Pragma("omp simd") for (int64_t j = 0; j < Wp; ++j) row[j] =
          block_activation(block_xhat(r0[j], prm), prm) + block_activation(block_xhat(r1[j], prm), prm);
      T* orow = o + i * s.Wo;
      for (int64_t j = 0; j < s.Wo; ++j) orow[j] = T(0.25) * (row[2 * j] + row[2 * j + 1]);
    }
  }
}

template <typename T>
DATM_ALWAYS_INLINE void backward_planes_impl(const BlockArgs<T>& a, int64_t p0, int64_t p1, T* ge) {
  const BlockShape& s = a.s;
  const int64_t M = s.M(), H = s.H, W = s.W, Wp = 2 * s.Wo;
  for (int64_t pl = p0; pl < p1; ++pl) {
    const BlockPlane<T> prm{a.mean[pl], a.rstd[pl], a.gamma[pl % s.C], a.beta[pl % s.C]};
    const T* x = a.z + pl * M;
    const T* g = a.grad_out + pl * s.Mo();
    T* d = a.out + pl * M;
    // Pass 1: gn into dz's memory (zero outside the pooling windows), and its two plane sums.
    T s1 = 0, s2 = 0;
    for (int64_t i = 0; i < H; ++i) {
      const T* xr = x + i * W;
      T* dr = d + i * W;
      if (i >= 2 * s.Ho) {
        std::fill(dr, dr + W, T(0));
        continue;
      }
      // The pooled gradient row spread over the window columns first, so that the loop below
      // vectorises (no j / 2 gather), its two sums as SIMD reductions.
      const T* gr = g + (i / 2) * s.Wo;
      for (int64_t j = 0; j < s.Wo; ++j) ge[2 * j] = ge[2 * j + 1] = gr[j];
      _Pragma("omp simd reduction(+ : s1, s2)") for (int64_t j = 0; j < Wp; ++j) {
        const T xh = block_xhat(xr[j], prm);
        const T gn = block_gn(xh, ge[j], prm);
        dr[j] = gn;
        s1 += gn;
        s2 += gn * xh;
      }
      for (int64_t j = Wp; j < W; ++j) dr[j] = 0;
    }
    a.out2[pl] = s1;
    a.out3[pl] = s2;
    const T m1 = s1 / static_cast<T>(M), m2 = s2 / static_cast<T>(M);
    // Pass 2 (from L1): dz = gamma * r * (gn - mean(gn) - xhat * mean(gn * xhat)).
    _Pragma("omp simd") for (int64_t k = 0; k < M; ++k) d[k] = block_grad_z(d[k], block_xhat(x[k], prm), prm, m1, m2);
  }
}

template <typename T>
DATM_ALWAYS_INLINE void double_backward_planes_impl(const BlockArgs<T>& a, int64_t p0, int64_t p1, T* ge, T* ga2) {
  const BlockShape& s = a.s;
  const int64_t M = s.M(), H = s.H, W = s.W;
  for (int64_t pl = p0; pl < p1; ++pl) {
    const int64_t c = pl % s.C;
    const BlockPlane<T> prm{a.mean[pl], a.rstd[pl], a.gamma[c], a.beta[c]};
    const T* x = a.z + pl * M;
    const T* uu = a.u + pl * M;
    const T* g = a.grad_out + pl * s.Mo();
    T* dzl = a.out + pl * M;
    T* dg = a.out2 + pl * s.Mo();
    // Pass 1: gn (kept in d_z's memory) and the five plane sums.
    T s_gn = 0, s_gn_xhat = 0, s_u = 0, s_u_xhat = 0, s_u_gn = 0;
    for (int64_t i = 0; i < H; ++i) {
      const T* xr = x + i * W;
      const T* ur = uu + i * W;
      T* gr_out = dzl + i * W;
      // ge: the pooled gradient spread over the window columns, zero outside the windows.
      if (i < 2 * s.Ho) {
        const T* gr = g + (i / 2) * s.Wo;
        for (int64_t j = 0; j < s.Wo; ++j) ge[2 * j] = ge[2 * j + 1] = gr[j];
        for (int64_t j = 2 * s.Wo; j < W; ++j) ge[j] = 0;
      } else {
        std::fill(ge, ge + W, T(0));
      }
      _Pragma("omp simd reduction(+ : s_gn, s_gn_xhat, s_u, s_u_xhat, s_u_gn)") for (int64_t j = 0; j < W; ++j) {
        const T xh = block_xhat(xr[j], prm);
        const T gn = block_gn(xh, ge[j], prm);
        gr_out[j] = gn;
        s_gn += gn;
        s_gn_xhat += gn * xh;
        s_u += ur[j];
        s_u_xhat += ur[j] * xh;
        s_u_gn += ur[j] * gn;
      }
    }
    const BlockDoubleBackwardSums<T> sums{s_gn, s_gn_xhat, s_u, s_u_xhat, s_u_gn};
    const T u_gamma = a.u_gamma[pl], u_beta = a.u_beta[pl];
    const BlockDoubleBackwardPlane<T> q = block_double_backward_plane(sums, M, prm, u_gamma);
    a.out3[pl] = q.d_gamma;
    // Pass 2 (from L1): d_z over gn, and the window sums of the pre-pooling adjoint into d_grad_out.
    for (int64_t i = 0; i < H; ++i) {
      const T* xr = x + i * W;
      const T* ur = uu + i * W;
      T* dr = dzl + i * W;
      T* ga = ga2 + (i % 2) * W;
      _Pragma("omp simd") for (int64_t j = 0; j < W; ++j) {
        T ga_adj, z_adj;
        block_double_backward_element(ur[j], block_xhat(xr[j], prm), dr[j], prm, q, u_gamma, u_beta, ga_adj, z_adj);
        ga[j] = ga_adj;
        dr[j] = z_adj;
      }
      if (i % 2 == 1 && i < 2 * s.Ho) {
        const T* ga0 = ga2;
        const T* ga1 = ga2 + W;
        T* dgr = dg + (i / 2) * s.Wo;
        for (int64_t j = 0; j < s.Wo; ++j) dgr[j] = T(0.25) * (ga0[2 * j] + ga0[2 * j + 1] + ga1[2 * j] + ga1[2 * j + 1]);
      }
    }
  }
}


// ----- sample kernels, channels_last: one range of samples, memory (B, H, W, C) ----------------------
// The convolutions run faster on channels_last input on this CPU (oneDNN at the IPC 10 micro-batch of
// 25: 278 against 205 GFLOP/s for forward + backward of the three layers; measured 2026-12-03), so
// the CPU engine keeps activations channels_last and these kernels take them as they are: a sample
// (32 x 32 x 128 floats = 512 KB, in L2) is the unit, every loop runs over the C contiguous channels.
template <typename T>
DATM_ALWAYS_INLINE void forward_samples_cl_impl(const BlockArgs<T>& a, int64_t b0, int64_t b1, T* acc) {
  const BlockShape& s = a.s;
  const int64_t C = s.C, HW = s.M(), W = s.W;
  const T inv_m = T(1) / static_cast<T>(HW);
  const T* __restrict__ gam = a.gamma;
  const T* __restrict__ bet = a.beta;
  for (int64_t b = b0; b < b1; ++b) {
    const T* x = a.z + b * HW * C;
    T* mean = a.mean + b * C;
    T* rstd = a.rstd + b * C;
    std::fill(acc, acc + C, T(0));
    for (int64_t k = 0; k < HW; ++k) {
      const T* xk = x + k * C;
      _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) acc[c] += xk[c];
    }
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = acc[c] * inv_m;
      acc[c] = 0;
    }
    for (int64_t k = 0; k < HW; ++k) {
      const T* xk = x + k * C;
      _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) acc[c] += (xk[c] - mean[c]) * (xk[c] - mean[c]);
    }
    for (int64_t c = 0; c < C; ++c) rstd[c] = T(1) / std::sqrt(acc[c] * inv_m + a.eps);
    T* o = a.out + b * s.Mo() * C;
    for (int64_t i = 0; i < s.Ho; ++i) {
      for (int64_t j = 0; j < s.Wo; ++j) {
        const T* x00 = x + ((2 * i) * W + 2 * j) * C;
        const T* x01 = x00 + C;
        const T* x10 = x00 + W * C;
        const T* x11 = x10 + C;
        T* oo = o + (i * s.Wo + j) * C;
        _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) {
          const T m = mean[c], r = rstd[c], ga = gam[c], be = bet[c];
          oo[c] = T(0.25) * (block_activation(block_xhat(x00[c], m, r), ga, be) +
                             block_activation(block_xhat(x01[c], m, r), ga, be) +
                             block_activation(block_xhat(x10[c], m, r), ga, be) +
                             block_activation(block_xhat(x11[c], m, r), ga, be));
        }
      }
    }
  }
}

template <typename T>
DATM_ALWAYS_INLINE void backward_samples_cl_impl(const BlockArgs<T>& a, int64_t b0, int64_t b1) {
  const BlockShape& s = a.s;
  const int64_t C = s.C, HW = s.M(), H = s.H, W = s.W;
  const T inv_m = T(1) / static_cast<T>(HW);
  const T* __restrict__ gam = a.gamma;
  const T* __restrict__ bet = a.beta;
  for (int64_t b = b0; b < b1; ++b) {
    const T* x = a.z + b * HW * C;
    const T* g = a.grad_out + b * s.Mo() * C;
    const T* mean = a.mean + b * C;
    const T* rstd = a.rstd + b * C;
    T* d = a.out + b * HW * C;
    T* s1 = a.out2 + b * C;  // sums of gn, then its mean
    T* s2 = a.out3 + b * C;  // sums of gn * xhat
    std::fill(s1, s1 + C, T(0));
    std::fill(s2, s2 + C, T(0));
    // Pass 1: gn into dz's memory (zero outside the pooling windows) and the per-channel sums.
    for (int64_t i = 0; i < H; ++i) {
      for (int64_t j = 0; j < W; ++j) {
        const T* xk = x + (i * W + j) * C;
        T* dk = d + (i * W + j) * C;
        if (i >= 2 * s.Ho || j >= 2 * s.Wo) {
          std::fill(dk, dk + C, T(0));
          continue;
        }
        const T* gk = g + ((i / 2) * s.Wo + j / 2) * C;
        _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) {
          const T xh = block_xhat(xk[c], mean[c], rstd[c]);
          const T gn = block_gn(xh, gk[c], gam[c], bet[c]);
          dk[c] = gn;
          s1[c] += gn;
          s2[c] += gn * xh;
        }
      }
    }
    // Pass 2: dz = gamma * r * (gn - mean(gn) - xhat * mean(gn * xhat)).
    for (int64_t k = 0; k < HW; ++k) {
      const T* xk = x + k * C;
      T* dk = d + k * C;
      _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) {
        const T xh = block_xhat(xk[c], mean[c], rstd[c]);
        dk[c] = block_grad_z(dk[c], xh, gam[c], rstd[c], s1[c] * inv_m, s2[c] * inv_m);
      }
    }
  }
}

template <typename T>
DATM_ALWAYS_INLINE void double_backward_samples_cl_impl(const BlockArgs<T>& a, int64_t b0, int64_t b1, T* work) {
  const BlockShape& s = a.s;
  const int64_t C = s.C, HW = s.M(), H = s.H, W = s.W;
  // Per-channel arrays (structure of arrays, so that the channel loops vectorise): the five sums of
  // pass 1, then the plane values of BlockDoubleBackwardPlane that pass 2 reads.
  T *s_gn = work, *s_gnx = work + C, *s_u = work + 2 * C, *s_ux = work + 3 * C, *s_ugn = work + 4 * C;
  T *qU1 = work + 5 * C, *qU2 = work + 6 * C, *qBm = work + 7 * C, *qmv = work + 8 * C, *qmvx = work + 9 * C,
    *qrho = work + 10 * C;
  const T* __restrict__ gam = a.gamma;
  const T* __restrict__ bet = a.beta;
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict__ ug = a.u_gamma + b * C;
    const T* __restrict__ ub = a.u_beta + b * C;
    const T* x = a.z + b * HW * C;
    const T* uu = a.u + b * HW * C;
    const T* g = a.grad_out + b * s.Mo() * C;
    const T* mean = a.mean + b * C;
    const T* rstd = a.rstd + b * C;
    T* dz = a.out + b * HW * C;
    T* dg = a.out2 + b * s.Mo() * C;
    T* dgam = a.out3 + b * C;
    // Pass 1: gn (kept in d_z's memory) and the five sums per channel.
    std::fill(work, work + 5 * C, T(0));
    for (int64_t i = 0; i < H; ++i) {
      for (int64_t j = 0; j < W; ++j) {
        const int64_t k = i * W + j;
        const T* xk = x + k * C;
        const T* uk = uu + k * C;
        T* gk_out = dz + k * C;
        const bool pooled = i < 2 * s.Ho && j < 2 * s.Wo;  // loop-invariant: the compiler unswitches it
        const T* gk = g + (std::min(i / 2, s.Ho - 1) * s.Wo + std::min(j / 2, s.Wo - 1)) * C;
        _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) {
          const T xh = block_xhat(xk[c], mean[c], rstd[c]);
          const T gn = pooled ? block_gn(xh, gk[c], gam[c], bet[c]) : T(0);
          gk_out[c] = gn;
          s_gn[c] += gn;
          s_gnx[c] += gn * xh;
          s_u[c] += uk[c];
          s_ux[c] += uk[c] * xh;
          s_ugn[c] += uk[c] * gn;
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const BlockPlane<T> prm{mean[c], rstd[c], a.gamma[c], a.beta[c]};
      const BlockDoubleBackwardSums<T> sums{s_gn[c], s_gnx[c], s_u[c], s_ux[c], s_ugn[c]};
      const BlockDoubleBackwardPlane<T> q = block_double_backward_plane(sums, HW, prm, ug[c]);
      qU1[c] = q.U1, qU2[c] = q.U2, qBm[c] = q.Bm, qmv[c] = q.mean_v, qmvx[c] = q.mean_v_xhat, qrho[c] = q.rho_term;
      dgam[c] = q.d_gamma;
    }
    // Pass 2: d_z over gn, and the window sums of the pre-pooling adjoint into d_grad_out.
    std::fill(dg, dg + s.Mo() * C, T(0));
    for (int64_t i = 0; i < H; ++i) {
      for (int64_t j = 0; j < W; ++j) {
        const int64_t k = i * W + j;
        const T* xk = x + k * C;
        const T* uk = uu + k * C;
        T* dk = dz + k * C;
        const T pool_weight = (i < 2 * s.Ho && j < 2 * s.Wo) ? T(0.25) : T(0);
        T* dgk = dg + (std::min(i / 2, s.Ho - 1) * s.Wo + std::min(j / 2, s.Wo - 1)) * C;
        _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) {
          T ga_adj, z_adj;
          block_double_backward_element(uk[c], block_xhat(xk[c], mean[c], rstd[c]), dk[c], gam[c], bet[c], rstd[c],
                                        qU1[c], qU2[c], qBm[c], qmv[c], qmvx[c], qrho[c], ug[c], ub[c], ga_adj,
                                        z_adj);
          dk[c] = z_adj;
          dgk[c] += pool_weight * ga_adj;
        }
      }
    }
  }
}

#define DATM_BLOCK_KERNELS(T)                                                                              \
  DATM_CPU_CLONES void forward_planes(const BlockArgs<T>& a, int64_t p0, int64_t p1, T* row) {             \
    forward_planes_impl(a, p0, p1, row);                                                                   \
  }                                                                                                        \
  DATM_CPU_CLONES void backward_planes(const BlockArgs<T>& a, int64_t p0, int64_t p1, T* ge) {             \
    backward_planes_impl(a, p0, p1, ge);                                                                   \
  }                                                                                                        \
  DATM_CPU_CLONES void double_backward_planes(const BlockArgs<T>& a, int64_t p0, int64_t p1, T* ge, T* ga) { \
    double_backward_planes_impl(a, p0, p1, ge, ga);                                                        \
  }                                                                                                        \
  DATM_CPU_CLONES void forward_samples_cl(const BlockArgs<T>& a, int64_t b0, int64_t b1, T* acc) {         \
    forward_samples_cl_impl(a, b0, b1, acc);                                                               \
  }                                                                                                        \
  DATM_CPU_CLONES void backward_samples_cl(const BlockArgs<T>& a, int64_t b0, int64_t b1) {                \
    backward_samples_cl_impl(a, b0, b1);                                                                   \
  }                                                                                                        \
  DATM_CPU_CLONES void double_backward_samples_cl(const BlockArgs<T>& a, int64_t b0, int64_t b1, T* work) { \
    double_backward_samples_cl_impl(a, b0, b1, work);                                                      \
  }
DATM_BLOCK_KERNELS(float)
DATM_BLOCK_KERNELS(double)
#undef DATM_BLOCK_KERNELS

// ----- launchers ----------------------------------------------------------------------------------
// The fields every kernel reads: shape, input, affine parameters and (after the forward) the statistics.
template <typename T>
BlockArgs<T> common_args(const BlockShape& s, const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& beta,
                         const at::Tensor& mean, const at::Tensor& rstd) {
  BlockArgs<T> a{};
  a.s = s;
  a.z = z.data_ptr<T>();
  a.gamma = gamma.data_ptr<T>();
  a.beta = beta.data_ptr<T>();
  a.mean = const_cast<T*>(mean.data_ptr<T>());
  a.rstd = const_cast<T*>(rstd.data_ptr<T>());
  return a;
}

// channels_last input (and not also NCHW-contiguous, as for C == 1) takes the sample kernels, and every
// output of the same shape keeps that layout; anything else is made NCHW-contiguous.
bool use_channels_last(const at::Tensor& z) {
  return z.is_contiguous(at::MemoryFormat::ChannelsLast) && !z.is_contiguous();
}

at::MemoryFormat layout_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_forward_cpu(const at::Tensor& z_in, const at::Tensor& gamma_in,
                                                                 const at::Tensor& beta_in, double eps) {
  const BlockShape s = check_block_inputs("block_forward", z_in, gamma_in, beta_in);
  const bool cl = use_channels_last(z_in);
  const at::Tensor z = z_in.contiguous(layout_of(cl)), gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  at::Tensor out = at::empty({s.B, s.C, s.Ho, s.Wo}, z.options().memory_format(layout_of(cl)));
  at::Tensor mean = at::empty({s.B, s.C}, z.options());
  at::Tensor rstd = at::empty({s.B, s.C}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "block_forward_cpu", [&] {
    BlockArgs<scalar_t> a = common_args<scalar_t>(s, z, gamma, beta, mean, rstd);
    a.out = out.data_ptr<scalar_t>();
    a.eps = static_cast<scalar_t>(eps);
    if (cl) {
      at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<scalar_t> acc(static_cast<size_t>(s.C));
        forward_samples_cl(a, b0, b1, acc.data());
      });
      return;
    }
    at::parallel_for(0, s.planes(), plane_grain(s), [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> row(static_cast<size_t>(s.W));
      forward_planes(a, p0, p1, row.data());
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_backward_cpu(const at::Tensor& gp_in, const at::Tensor& z_in,
                                                                  const at::Tensor& gamma_in,
                                                                  const at::Tensor& beta_in,
                                                                  const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in) {
  const BlockShape s = check_block_inputs("block_backward", z_in, gamma_in, beta_in);
  check_block_like("block_backward", "grad_out", gp_in, {s.B, s.C, s.Ho, s.Wo}, z_in);
  check_block_like("block_backward", "mean", mean_in, {s.B, s.C}, z_in);
  check_block_like("block_backward", "rstd", rstd_in, {s.B, s.C}, z_in);
  const bool cl = use_channels_last(z_in);
  const at::Tensor gpool = gp_in.contiguous(layout_of(cl)), z = z_in.contiguous(layout_of(cl)),
                   gamma = gamma_in.contiguous(), beta = beta_in.contiguous(), mean = mean_in.contiguous(),
                   rstd = rstd_in.contiguous();
  at::Tensor dz = at::empty_like(z, layout_of(cl));
  at::Tensor sum_gn = at::empty({s.B, s.C}, z.options());
  at::Tensor sum_gn_xhat = at::empty({s.B, s.C}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "block_backward_cpu", [&] {
    BlockArgs<scalar_t> a = common_args<scalar_t>(s, z, gamma, beta, mean, rstd);
    a.grad_out = gpool.data_ptr<scalar_t>();
    a.out = dz.data_ptr<scalar_t>();
    a.out2 = sum_gn.data_ptr<scalar_t>();
    a.out3 = sum_gn_xhat.data_ptr<scalar_t>();
    if (cl) {
      at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) { backward_samples_cl(a, b0, b1); });
      return;
    }
    at::parallel_for(0, s.planes(), plane_grain(s), [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> ge(static_cast<size_t>(s.W));
      backward_planes(a, p0, p1, ge.data());
    });
  });
  return {dz, sum_gn, sum_gn_xhat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_double_backward_cpu(
    const at::Tensor& u_in, const at::Tensor& u_gamma_in, const at::Tensor& u_beta_in, const at::Tensor& gp_in,
    const at::Tensor& z_in, const at::Tensor& gamma_in, const at::Tensor& beta_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in) {
  const BlockShape s = check_block_inputs("block_double_backward", z_in, gamma_in, beta_in);
  check_block_like("block_double_backward", "u", u_in, z_in.sizes(), z_in);
  check_block_like("block_double_backward", "u_gamma", u_gamma_in, {s.B, s.C}, z_in);
  check_block_like("block_double_backward", "u_beta", u_beta_in, {s.B, s.C}, z_in);
  check_block_like("block_double_backward", "grad_out", gp_in, {s.B, s.C, s.Ho, s.Wo}, z_in);
  check_block_like("block_double_backward", "mean", mean_in, {s.B, s.C}, z_in);
  check_block_like("block_double_backward", "rstd", rstd_in, {s.B, s.C}, z_in);
  const bool cl = use_channels_last(z_in);
  const at::Tensor u = u_in.contiguous(layout_of(cl)), ug = u_gamma_in.contiguous(), ub = u_beta_in.contiguous(),
                   gpool = gp_in.contiguous(layout_of(cl)), z = z_in.contiguous(layout_of(cl)),
                   gamma = gamma_in.contiguous(), beta = beta_in.contiguous(), mean = mean_in.contiguous(),
                   rstd = rstd_in.contiguous();
  at::Tensor d_gp = at::empty_like(gpool, layout_of(cl));
  at::Tensor d_z = at::empty_like(z, layout_of(cl));
  at::Tensor d_gamma = at::empty({s.B, s.C}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "block_double_backward_cpu", [&] {
    BlockArgs<scalar_t> a = common_args<scalar_t>(s, z, gamma, beta, mean, rstd);
    a.grad_out = gpool.data_ptr<scalar_t>();
    a.u = u.data_ptr<scalar_t>();
    a.u_gamma = ug.data_ptr<scalar_t>();
    a.u_beta = ub.data_ptr<scalar_t>();
    a.out = d_z.data_ptr<scalar_t>();
    a.out2 = d_gp.data_ptr<scalar_t>();
    a.out3 = d_gamma.data_ptr<scalar_t>();
    if (cl) {
      at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<scalar_t> work(static_cast<size_t>(11 * s.C));
        double_backward_samples_cl(a, b0, b1, work.data());
      });
      return;
    }
    at::parallel_for(0, s.planes(), plane_grain(s), [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> ge(static_cast<size_t>(s.W)), ga(static_cast<size_t>(2 * s.W));
      double_backward_planes(a, p0, p1, ge.data(), ga.data());
    });
  });
  return {d_gp, d_z, d_gamma};
}

}  // namespace
}  // namespace datm_fast

TORCH_LIBRARY_FRAGMENT(datm_fast, m) {
  m.def("block_forward(Tensor z, Tensor gamma, Tensor beta, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "block_backward(Tensor grad_out, Tensor z, Tensor gamma, Tensor beta, Tensor mean, Tensor rstd) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "block_double_backward(Tensor u, Tensor u_gamma, Tensor u_beta, Tensor grad_out, Tensor z, Tensor gamma, "
      "Tensor beta, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(datm_fast, CPU, m) {
  m.impl("block_forward", &datm_fast::block_forward_cpu);
  m.impl("block_backward", &datm_fast::block_backward_cpu);
  m.impl("block_double_backward", &datm_fast::block_double_backward_cpu);
}

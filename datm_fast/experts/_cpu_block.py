"""CPU kernels for instance norm -> ReLU -> 2x2 average pool, one pass per sample, compiled on first use.

Why: on the 2-core CPU the memory-bound block around each convolution cost as much as the
convolutions themselves. aten makes about 10 passes over each activation (norm statistics, norm,
ReLU, pool, and their backwards; the first layer's activation is 134 MB at batch 256);
``torch.compile`` fuses them into 4-6 passes over the whole batch. These kernels process one sample
at a time (512 KB for the CIFAR ConvNet's first layer, which stays in the 2 MB L2 cache): the forward
reads the activation from memory once (statistics, then normalise + ReLU + pool from cache), the
backward reads it once and writes its gradient once. Measured per fwd+bwd of the three layers at
batch 256 on the 2-core CPU: 128 ms against 341 ms for the ``torch.compile`` kernels in the same
process (and about 400 ms for aten).

The C++ source below is compiled with ``torch.utils.cpp_extension.load_inline`` the first time it is
needed (about 20 s; cached under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``,
so later processes load it in well under a second). It needs a C++ compiler and ninja; where they
are missing, :func:`load_cpu_block` returns ``None`` and training uses other kernels.

Layout: channels_last float32 (``(B, C, H, W)`` tensors whose memory is ``(B, H, W, C)``), even H, W.
"""

from __future__ import annotations

import hashlib
import platform
import warnings
from typing import Any

__all__ = ["CPU_BLOCK_SOURCE", "load_cpu_block"]

CPU_BLOCK_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check_input(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.dim());
}

}  // namespace

// h: (B, C, H, W) channels_last. Returns out (B, C, H/2, W/2) channels_last, mean and rstd (B, C).
std::vector<torch::Tensor> block_forward(torch::Tensor h, torch::Tensor gamma, torch::Tensor beta, double eps) {
  check_input(h, "h", 4);
  check_input(gamma, "gamma", 1);
  check_input(beta, "beta", 1);
  TORCH_CHECK(h.is_contiguous(at::MemoryFormat::ChannelsLast), "h must be channels_last contiguous");
  const int64_t B = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3), HW = H * W;
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0, "H and W must be even, got ", H, "x", W);
  TORCH_CHECK(gamma.numel() == C && beta.numel() == C, "gamma and beta must have C = ", C, " elements");
  gamma = gamma.contiguous();
  beta = beta.contiguous();
  auto out = torch::empty({B, C, H / 2, W / 2}, h.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto mean = torch::empty({B, C}, h.options());
  auto rstd = torch::empty({B, C}, h.options());
  const float* __restrict__ hp = h.data_ptr<float>();
  const float* __restrict__ gp = gamma.data_ptr<float>();
  const float* __restrict__ bp = beta.data_ptr<float>();
  float* __restrict__ op = out.data_ptr<float>();
  float* __restrict__ mp = mean.data_ptr<float>();
  float* __restrict__ rp = rstd.data_ptr<float>();
  const float inv_n = 1.0f / static_cast<float>(HW);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc_v(C), a_v(C), s_v(C);
    float* __restrict__ acc = acc_v.data();
    float* __restrict__ a = a_v.data();
    float* __restrict__ s = s_v.data();
    for (int64_t b = b0; b < b1; ++b) {
      const float* __restrict__ x = hp + b * HW * C;
      float* __restrict__ m = mp + b * C;
      // Two-pass statistics (mean, then squared deviations), as stable as aten's; the second pass
      // reads the sample from cache.
      std::fill(acc, acc + C, 0.0f);
      for (int64_t p = 0; p < HW; ++p) {
        const float* __restrict__ xp = x + p * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += xp[c];
      }
      for (int64_t c = 0; c < C; ++c) { m[c] = acc[c] * inv_n; acc[c] = 0.0f; }
      for (int64_t p = 0; p < HW; ++p) {
        const float* __restrict__ xp = x + p * C;
        for (int64_t c = 0; c < C; ++c) { const float d = xp[c] - m[c]; acc[c] += d * d; }
      }
      for (int64_t c = 0; c < C; ++c) {
        const float r = 1.0f / std::sqrt(acc[c] * inv_n + static_cast<float>(eps));
        rp[b * C + c] = r;
        a[c] = gp[c] * r;
        s[c] = bp[c] - m[c] * a[c];
      }
      float* __restrict__ o = op + b * (HW / 4) * C;
      for (int64_t i = 0; i < H / 2; ++i) {
        for (int64_t j = 0; j < W / 2; ++j) {
          const float* __restrict__ x00 = x + ((2 * i) * W + 2 * j) * C;
          const float* __restrict__ x01 = x00 + C;
          const float* __restrict__ x10 = x00 + W * C;
          const float* __restrict__ x11 = x10 + C;
          float* __restrict__ oo = o + (i * (W / 2) + j) * C;
          for (int64_t c = 0; c < C; ++c) {
            const float v = std::max(x00[c] * a[c] + s[c], 0.0f) + std::max(x01[c] * a[c] + s[c], 0.0f) +
                            std::max(x10[c] * a[c] + s[c], 0.0f) + std::max(x11[c] * a[c] + s[c], 0.0f);
            oo[c] = 0.25f * v;
          }
        }
      }
    }
  });
  return {out, mean, rstd};
}

// g = dL/dout (B, C, H/2, W/2) channels_last. Returns dh (channels_last) and the per-sample sums
// s1 = sum(gz), s2 = sum(gz * xhat) (B, C), whose batch sums are dbeta and dgamma.
std::vector<torch::Tensor> block_backward(torch::Tensor g, torch::Tensor h, torch::Tensor mean, torch::Tensor rstd,
                                          torch::Tensor gamma, torch::Tensor beta) {
  check_input(g, "g", 4);
  check_input(h, "h", 4);
  check_input(mean, "mean", 2);
  check_input(rstd, "rstd", 2);
  TORCH_CHECK(h.is_contiguous(at::MemoryFormat::ChannelsLast) && g.is_contiguous(at::MemoryFormat::ChannelsLast),
              "h and g must be channels_last contiguous");
  const int64_t B = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3), HW = H * W;
  TORCH_CHECK(g.size(0) == B && g.size(1) == C && g.size(2) == H / 2 && g.size(3) == W / 2, "g has the wrong shape");
  gamma = gamma.contiguous();
  beta = beta.contiguous();
  mean = mean.contiguous();
  rstd = rstd.contiguous();
  auto dh = torch::empty({B, C, H, W}, h.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto s1 = torch::empty({B, C}, h.options());
  auto s2 = torch::empty({B, C}, h.options());
  const float* __restrict__ hp = h.data_ptr<float>();
  const float* __restrict__ gq = g.data_ptr<float>();
  const float* __restrict__ mp = mean.data_ptr<float>();
  const float* __restrict__ rp = rstd.data_ptr<float>();
  const float* __restrict__ gm = gamma.data_ptr<float>();
  const float* __restrict__ bt = beta.data_ptr<float>();
  float* __restrict__ dp = dh.data_ptr<float>();
  float* __restrict__ s1p = s1.data_ptr<float>();
  float* __restrict__ s2p = s2.data_ptr<float>();
  const float inv_n = 1.0f / static_cast<float>(HW);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> a_v(C), s_v(C), c1_v(C), c2_v(C);
    float* __restrict__ a = a_v.data();
    float* __restrict__ s = s_v.data();
    float* __restrict__ c1 = c1_v.data();
    float* __restrict__ c2 = c2_v.data();
    for (int64_t b = b0; b < b1; ++b) {
      const float* __restrict__ x = hp + b * HW * C;
      const float* __restrict__ gg = gq + b * (HW / 4) * C;
      const float* __restrict__ m = mp + b * C;
      const float* __restrict__ r = rp + b * C;
      for (int64_t c = 0; c < C; ++c) {
        a[c] = gm[c] * r[c];
        s[c] = bt[c] - m[c] * a[c];
        c1[c] = 0.0f;
        c2[c] = 0.0f;
      }
      // Pass 1: gz = (pool gradient spread over the window) * (ReLU on); sums of gz and gz * xhat.
      for (int64_t i = 0; i < H; ++i) {
        for (int64_t j = 0; j < W; ++j) {
          const float* __restrict__ xp = x + (i * W + j) * C;
          const float* __restrict__ gp = gg + ((i / 2) * (W / 2) + j / 2) * C;
          for (int64_t c = 0; c < C; ++c) {
            const float gz = (xp[c] * a[c] + s[c] > 0.0f) ? 0.25f * gp[c] : 0.0f;
            c1[c] += gz;
            c2[c] += gz * ((xp[c] - m[c]) * r[c]);
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        s1p[b * C + c] = c1[c];
        s2p[b * C + c] = c2[c];
        c1[c] *= inv_n;
        c2[c] *= inv_n;
      }
      // Pass 2 (sample in cache): dh = gamma * rstd * (gz - mean(gz) - xhat * mean(gz * xhat)).
      float* __restrict__ d = dp + b * HW * C;
      for (int64_t i = 0; i < H; ++i) {
        for (int64_t j = 0; j < W; ++j) {
          const float* __restrict__ xp = x + (i * W + j) * C;
          const float* __restrict__ gp = gg + ((i / 2) * (W / 2) + j / 2) * C;
          float* __restrict__ dd = d + (i * W + j) * C;
          for (int64_t c = 0; c < C; ++c) {
            const float gz = (xp[c] * a[c] + s[c] > 0.0f) ? 0.25f * gp[c] : 0.0f;
            const float xh = (xp[c] - m[c]) * r[c];
            dd[c] = a[c] * (gz - c1[c] - xh * c2[c]);
          }
        }
      }
    }
  });
  return {dh, s1, s2};
}
"""


def _machine_tag() -> str:
    """Distinguishes CPUs in the extension's name: it is built with -march=native, so a build cache shared
    between machines (an NFS home) must not hand one CPU's binary to another."""
    ident = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    ident += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return hashlib.sha256(ident.encode()).hexdigest()[:10]


def load_cpu_block(*, verbose: bool = False) -> Any | None:
    """The compiled module (``block_forward``, ``block_backward``), or ``None`` with a warning if it cannot
    be built here. Building takes about 20 s the first time on 2 cores, then it is loaded from the cache."""
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name=f"datm_fast_experts_cpu_block_{_machine_tag()}",
            cpp_sources=CPU_BLOCK_SOURCE,
            functions=["block_forward", "block_backward"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=verbose,
        )
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: use other kernels
        warnings.warn(
            f"could not build the CPU norm/ReLU/pool kernels ({type(e).__name__}: {str(e)[:300]}); "
            "falling back to slower kernels",
            RuntimeWarning,
            stacklevel=2,
        )
        return None

"""The fused ConvNet block epilogue (instance norm (affine) -> ReLU -> 2x2 average pool) in Triton.

The same three operators as the C++ and CUDA kernels, computing what ``csrc/block.h`` computes (the
formulas and their derivation: :mod:`datm_fast.reference.block`):

    block_forward(z, gamma, beta, eps)             -> (out, mean, rstd)
    block_backward(gp, z, gamma, beta, mean, rstd) -> (dz, sum_gn, sum_gn_xhat)
    block_double_backward(u, u_sum_gn_xhat, u_sum_gn, gp, z, gamma, beta, mean, rstd)
                                                   -> (d_gp, d_z, d_gamma per plane)

Design: one program per (sample, channel) plane, as the CUDA kernels' one thread block per plane; the
whole plane is one vector of ``BLOCK = next_power_of_2(H * W)`` lanes (planes of at most
:data:`MAX_PLANE_ELEMENTS`, 64 x 64: the CIFAR ConvNet's are 32 x 32 and smaller), so each plane sum is
one ``tl.sum`` and every later pass reads the values it already holds. The pooled outputs (and the
double backward's adjoint of the pooled gradient) are a (``BLOCK_OUT``, 4) tile: each output lane
gathers the four elements of its window, as the CUDA kernels do, and sums them with ``tl.sum`` (in
another order than the CUDA kernels' left-to-right sum: float32 results differ in the last bits). The
ReLU mask is decided in one way everywhere (``gamma * xhat + beta > 0``, :func:`_relu_on`), so the three
kernels agree on every element; an odd last row or column lies outside every pooling window
(``avg_pool2d`` floors). float32 accumulates in float32, float64 in float64.

Layout: NCHW. Every wrapper makes its tensor inputs contiguous (``.contiguous()``: a channels_last
input is copied to NCHW) and returns NCHW outputs, as the CUDA operators do; the C++ operators keep a
channels_last CPU input's layout, these kernels do not.

Launch: on a GPU the autotuner picks ``num_warps`` per plane size among the plane-size guess of
:func:`_num_warps_for` and its neighbours (it runs each candidate on the first call of a plane size,
so warm the kernels up before a CUDA graph capture); in the interpreter there is one config. Results
are bit-for-bit reproducible for one config; another process whose autotuner picked another
``num_warps`` may sum a float32 plane in another order (last-bit differences).

Limits: float32 or float64, (B, C, H, W) with H, W >= 2 and H * W <= :data:`MAX_PLANE_ELEMENTS`, all
tensors on one device.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["MAX_PLANE_ELEMENTS", "block_backward", "block_double_backward", "block_forward"]

# A plane is one vector held in registers. ptxas for sm_90a (Triton 3.9, compiled without a GPU): at
# 64 x 64 with the guessed 8 warps no kernel spills (the float64 double backward takes 156 registers
# a thread); with 2 warps the float64 backward kernels spill, with 1 every float64 kernel. The
# ConvNets' planes are at most 64 x 64; a larger plane would need a loop over chunks of it.
MAX_PLANE_ELEMENTS = 4096


def _num_warps_for(block: int) -> int:
    """The plane-size guess: about 256 lanes per warp, 1 to 8 warps (8 at 64 x 64, where fewer spill
    registers). Its speed is not measured yet (no GPU run of these kernels so far); the autotuner tries
    it and its neighbours."""
    return max(1, min(8, block // 256))


def _launch_configs() -> list[triton.Config]:
    # The interpreter ignores num_warps: one config, nothing to time.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({}, num_warps=1)]
    return [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8)]


def _near_the_plane_size_guess(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs whose num_warps is within a factor of 2 of :func:`_num_warps_for`'s guess."""
    guess = _num_warps_for(kwargs["BLOCK"])
    return [c for c in configs if guess // 2 <= c.num_warps <= 2 * guess] or configs


def _autotuned(fn):
    """The launch policy of the three kernels: autotuned on a GPU, one config in the interpreter."""
    return triton.autotune(
        configs=_launch_configs(),
        key=["BLOCK", "BLOCK_OUT"],  # the tensor arguments' dtypes are part of the key too
        prune_configs_by={"early_config_prune": _near_the_plane_size_guess},
    )(fn)


# ----- IEEE-rounded division and square root, as block.h's C++ and CUDA (nvcc's default) -------------
# Triton's float32 `/` and tl.sqrt may be approximate on a GPU; the per-plane divisions and the square
# root are few (per plane, not per element), so they take the rounded forms. float64's are exact.
@triton.jit
def _div_rn(a, b):  # b a tensor, a a tensor or a Python float
    if b.dtype == tl.float32:
        quotient = tl.div_rn(a, b)
    else:
        quotient = a / b
    return quotient


@triton.jit
def _sqrt_rn(x):
    if x.dtype == tl.float32:
        root = tl.sqrt_rn(x)
    else:
        root = tl.sqrt(x)
    return root


# ----- block.h's per-element arithmetic ----------------------------------------------------------------
@triton.jit
def _relu_on(xhat, gamma, beta):
    """The ReLU mask, decided in one way in the three kernels (block.h's block_relu_on)."""
    return gamma * xhat + beta > 0.0


@triton.jit
def _activation(z, mean, rstd, gamma, beta):
    """relu(gamma * xhat + beta) (block.h's block_activation)."""
    xhat = (z - mean) * rstd
    return tl.where(_relu_on(xhat, gamma, beta), gamma * xhat + beta, 0.0)


@triton.jit
def _gn(xhat, grad_pooled, windowed, gamma, beta):
    """gn = [n > 0] * dL/dp / 4, zero outside the pooling windows (block.h's block_gn)."""
    return tl.where(windowed & _relu_on(xhat, gamma, beta), 0.25 * grad_pooled, 0.0)


@triton.jit
def _ga_adj(u, z, mean, rstd, gamma, beta, U1, U2, u_gamma, u_beta):
    """The adjoint of the pooled gradient's input before pooling (block.h's ga_adj of
    block_double_backward_element; it does not depend on gn)."""
    xhat = (z - mean) * rstd
    t = rstd * (u - U1 - xhat * U2)
    return tl.where(_relu_on(xhat, gamma, beta), gamma * t + u_gamma * xhat + u_beta, 0.0)


@triton.jit
def _windows(H, W, BLOCK_OUT: tl.constexpr):
    """The pooled outputs' lanes (``pooled``: inside the pooled plane) and a (BLOCK_OUT, 4) tile of the
    plane offsets of their windows' elements (top left, top right, bottom left, bottom right)."""
    Wo = W // 2
    o = tl.arange(0, BLOCK_OUT)
    corner = tl.arange(0, 4)[None, :]
    window = (2 * (o // Wo) * W + 2 * (o % Wo))[:, None] + corner % 2 + (corner // 2) * W
    return o, o < (H // 2) * Wo, window


@triton.jit
def _plane_xhat_gn(grad_out_ptr, z_ptr, plane, mean, rstd, gamma, beta, H, W, BLOCK: tl.constexpr):
    """One plane's lanes ``k`` (``inside`` the plane), its xhat and its gn."""
    Ho = H // 2
    Wo = W // 2
    k = tl.arange(0, BLOCK)
    inside = k < H * W
    row = k // W
    col = k % W
    windowed = inside & (row < 2 * Ho) & (col < 2 * Wo)
    xhat = (tl.load(z_ptr + plane * H * W + k, mask=inside, other=0.0) - mean) * rstd
    g = tl.load(grad_out_ptr + plane * Ho * Wo + (row // 2) * Wo + col // 2, mask=windowed, other=0.0)
    return k, inside, xhat, _gn(xhat, g, windowed, gamma, beta)


# ----- kernels: one program per (sample, channel) plane -----------------------------------------------
@_autotuned
@triton.jit
def _block_forward_kernel(
    z_ptr,  # (B, C, H, W) NCHW contiguous
    gamma_ptr,  # (C,)
    beta_ptr,  # (C,)
    out_ptr,  # (B, C, H // 2, W // 2): the pooled output
    mean_ptr,  # (B, C): each plane's mean and 1 / sqrt(var + eps), for the backward kernels
    rstd_ptr,
    C,
    H,
    W,
    EPS: tl.constexpr,  # a constant, not an argument: a float argument would be float32, eps of float64 exact
    BLOCK: tl.constexpr,  # next power of two of H * W
    BLOCK_OUT: tl.constexpr,  # next power of two of (H // 2) * (W // 2)
):
    plane = tl.program_id(0).to(tl.int64)
    M = H * W
    Ho = H // 2
    Wo = W // 2
    k = tl.arange(0, BLOCK)
    inside = k < M
    x = tl.load(z_ptr + plane * M + k, mask=inside, other=0.0)
    m = M.to(x.dtype)
    # Two passes (mean, then squared deviations), as block_cpu.cpp and block_cuda.cu.
    mean = _div_rn(tl.sum(x, axis=0), m)
    dev = tl.where(inside, x - mean, 0.0)
    rstd = _div_rn(1.0, _sqrt_rn(_div_rn(tl.sum(dev * dev, axis=0), m) + EPS))
    tl.store(mean_ptr + plane, mean)
    tl.store(rstd_ptr + plane, rstd)
    gamma = tl.load(gamma_ptr + plane % C)
    beta = tl.load(beta_ptr + plane % C)
    # Each output gathers its window's four elements (from the cache: the plane was just read).
    o, pooled, window = _windows(H, W, BLOCK_OUT)
    z_windows = tl.load(z_ptr + plane * M + window, mask=pooled[:, None], other=0.0)
    total = tl.sum(_activation(z_windows, mean, rstd, gamma, beta), axis=1)
    tl.store(out_ptr + plane * Ho * Wo + o, 0.25 * total, mask=pooled)


@_autotuned
@triton.jit
def _block_backward_kernel(
    grad_out_ptr,  # (B, C, H // 2, W // 2): dL/dp
    z_ptr,
    gamma_ptr,
    beta_ptr,
    mean_ptr,
    rstd_ptr,
    dz_ptr,  # (B, C, H, W)
    sum_gn_ptr,  # (B, C): per-plane sums whose batch sums are dbeta and dgamma
    sum_gn_xhat_ptr,
    C,
    H,
    W,
    BLOCK: tl.constexpr,
    BLOCK_OUT: tl.constexpr,  # unused: in the signature so that the three kernels share the autotuner's key
):
    plane = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_ptr + plane)
    rstd = tl.load(rstd_ptr + plane)
    gamma = tl.load(gamma_ptr + plane % C)
    beta = tl.load(beta_ptr + plane % C)
    k, inside, xhat, gn = _plane_xhat_gn(grad_out_ptr, z_ptr, plane, mean, rstd, gamma, beta, H, W, BLOCK)
    s_gn = tl.sum(gn, axis=0)  # lanes past the plane have gn = 0
    s_gn_xhat = tl.sum(gn * xhat, axis=0)
    tl.store(sum_gn_ptr + plane, s_gn)
    tl.store(sum_gn_xhat_ptr + plane, s_gn_xhat)
    m = (H * W).to(xhat.dtype)
    dz = gamma * rstd * (gn - _div_rn(s_gn, m) - xhat * _div_rn(s_gn_xhat, m))
    tl.store(dz_ptr + plane * H * W + k, dz, mask=inside)


@_autotuned
@triton.jit
def _block_double_backward_kernel(
    u_ptr,  # (B, C, H, W): the adjoint of dz
    u_gamma_ptr,  # (B, C): the adjoint of sum_gn_xhat
    u_beta_ptr,  # (B, C): the adjoint of sum_gn
    grad_out_ptr,
    z_ptr,
    gamma_ptr,
    beta_ptr,
    mean_ptr,
    rstd_ptr,
    d_grad_out_ptr,  # (B, C, H // 2, W // 2)
    d_z_ptr,  # (B, C, H, W)
    d_gamma_ptr,  # (B, C): each plane's share of the adjoint of gamma
    C,
    H,
    W,
    BLOCK: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    M = H * W
    Ho = H // 2
    Wo = W // 2
    mean = tl.load(mean_ptr + plane)
    r = tl.load(rstd_ptr + plane)
    gamma = tl.load(gamma_ptr + plane % C)
    beta = tl.load(beta_ptr + plane % C)
    u_gamma = tl.load(u_gamma_ptr + plane)
    u_beta = tl.load(u_beta_ptr + plane)
    k, inside, xhat, gn = _plane_xhat_gn(grad_out_ptr, z_ptr, plane, mean, r, gamma, beta, H, W, BLOCK)
    u = tl.load(u_ptr + plane * M + k, mask=inside, other=0.0)
    # The five plane sums (lanes past the plane have u = gn = 0), then block_double_backward_plane.
    s_gn = tl.sum(gn, axis=0)
    s_gn_xhat = tl.sum(gn * xhat, axis=0)
    s_u = tl.sum(u, axis=0)
    s_u_xhat = tl.sum(u * xhat, axis=0)
    s_u_gn = tl.sum(u * gn, axis=0)
    m = M.to(xhat.dtype)
    inv_m = _div_rn(1.0, m)
    U1 = s_u * inv_m  # mean(u)
    U2 = s_u_xhat * inv_m  # mean(u * xhat)
    A = gamma * s_gn * inv_m  # mean(ghat), ghat = gamma * gn
    Bm = gamma * s_gn_xhat * inv_m  # mean(ghat * xhat)
    # v = -r * (u * Bm + U2 * ghat) + u_gamma * gn, the adjoint of xhat; its two plane means:
    mean_v = -r * (Bm * U1 + U2 * A) + u_gamma * s_gn * inv_m
    mean_v_xhat = -2.0 * r * Bm * U2 + u_gamma * s_gn_xhat * inv_m
    rho = gamma * s_u_gn - m * (A * U1 + Bm * U2)  # sum(u * dz) / r, the adjoint of r
    rho_term = rho * r * r * inv_m
    tl.store(d_gamma_ptr + plane, r * (s_u_gn - U1 * s_gn - U2 * s_gn_xhat))
    v = -r * (u * Bm + U2 * gamma * gn) + u_gamma * gn
    d_z = r * (v - mean_v - xhat * mean_v_xhat) - rho_term * xhat
    tl.store(d_z_ptr + plane * M + k, d_z, mask=inside)
    # The pooled gradient's adjoint: the window sums of ga_adj / 4, gathered as the forward gathers.
    o, pooled, window = _windows(H, W, BLOCK_OUT)
    u_windows = tl.load(u_ptr + plane * M + window, mask=pooled[:, None], other=0.0)
    z_windows = tl.load(z_ptr + plane * M + window, mask=pooled[:, None], other=0.0)
    ga = _ga_adj(u_windows, z_windows, mean, r, gamma, beta, U1, U2, u_gamma, u_beta)
    total = tl.sum(ga, axis=1)
    tl.store(d_grad_out_ptr + plane * Ho * Wo + o, 0.25 * total, mask=pooled)


# ----- wrappers: the operators' signatures and outputs -------------------------------------------------
def _check_block_inputs(op: str, z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """csrc/checks.h's check_block_inputs, plus the plane-size limit of these kernels."""
    if z.dim() != 4:
        raise ValueError(f"{op}: z must be (B, C, H, W), got shape {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: expected float32 or float64, got {z.dtype}")
    B, C, H, W = z.shape
    if H < 2 or W < 2:
        raise ValueError(f"{op}: H and W must be at least 2 for 2x2 pooling, got shape {tuple(z.shape)}")
    if H * W > MAX_PLANE_ELEMENTS:
        raise ValueError(f"{op}: the Triton kernels take planes of at most {MAX_PLANE_ELEMENTS} elements, got {H}x{W}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        _check_like(op, name, t, (C,), z)


def _check_like(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...], z: torch.Tensor) -> None:
    """Another input of a block operator: the given shape, z's dtype and device (checks.h's check_block_like)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != z.dtype or t.device != z.device:
        raise ValueError(f"{op}: {name} must have z's dtype and device ({z.dtype}, {z.device})")


def _blocks(H: int, W: int) -> dict[str, int]:
    return {"BLOCK": triton.next_power_of_2(H * W), "BLOCK_OUT": triton.next_power_of_2(max(1, (H // 2) * (W // 2)))}


def block_forward(
    z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out (B, C, H // 2, W // 2), mean (B, C), rstd (B, C))``: the pooled output and each plane's
    statistics. ``z`` is made NCHW contiguous."""
    _check_block_inputs("block_forward", z, gamma, beta)
    z, gamma, beta = z.contiguous(), gamma.contiguous(), beta.contiguous()
    B, C, H, W = z.shape
    out = z.new_empty(B, C, H // 2, W // 2)
    mean, rstd = z.new_empty(B, C), z.new_empty(B, C)
    if B * C:
        _block_forward_kernel[(B * C,)](z, gamma, beta, out, mean, rstd, C, H, W, EPS=float(eps), **_blocks(H, W))
    return out, mean, rstd


def block_backward(
    gp: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dz (B, C, H, W), sum_gn (B, C), sum_gn_xhat (B, C))``: the batch sums of the last two are dbeta
    and dgamma. ``mean`` and ``rstd`` are :func:`block_forward`'s; every tensor is made NCHW contiguous."""
    op = "block_backward"
    _check_block_inputs(op, z, gamma, beta)
    B, C, H, W = z.shape
    _check_like(op, "grad_out", gp, (B, C, H // 2, W // 2), z)
    _check_like(op, "mean", mean, (B, C), z)
    _check_like(op, "rstd", rstd, (B, C), z)
    gp, z, gamma, beta, mean, rstd = (t.contiguous() for t in (gp, z, gamma, beta, mean, rstd))
    dz = torch.empty_like(z)
    sum_gn, sum_gn_xhat = z.new_empty(B, C), z.new_empty(B, C)
    if B * C:
        _block_backward_kernel[(B * C,)](
            gp, z, gamma, beta, mean, rstd, dz, sum_gn, sum_gn_xhat, C, H, W, **_blocks(H, W)
        )
    return dz, sum_gn, sum_gn_xhat


def block_double_backward(
    u: torch.Tensor,
    u_sum_gn_xhat: torch.Tensor,
    u_sum_gn: torch.Tensor,
    gp: torch.Tensor,
    z: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d_gp (B, C, H // 2, W // 2), d_z (B, C, H, W), d_gamma (B, C))``: the adjoints of
    :func:`block_backward`'s inputs given ``u`` (of dz) and ``u_sum_gn_xhat``, ``u_sum_gn`` (of its
    per-plane sums); d_gamma is per plane, its batch sum the adjoint of gamma; d beta is zero. Every
    tensor is made NCHW contiguous (an adjoint expanded from (C,) to (B, C) included)."""
    op = "block_double_backward"
    _check_block_inputs(op, z, gamma, beta)
    B, C, H, W = z.shape
    _check_like(op, "u", u, (B, C, H, W), z)
    _check_like(op, "u_gamma", u_sum_gn_xhat, (B, C), z)
    _check_like(op, "u_beta", u_sum_gn, (B, C), z)
    _check_like(op, "grad_out", gp, (B, C, H // 2, W // 2), z)
    _check_like(op, "mean", mean, (B, C), z)
    _check_like(op, "rstd", rstd, (B, C), z)
    tensors = (u, u_sum_gn_xhat, u_sum_gn, gp, z, gamma, beta, mean, rstd)
    u, u_sum_gn_xhat, u_sum_gn, gp, z, gamma, beta, mean, rstd = (t.contiguous() for t in tensors)
    d_gp, d_z, d_gamma = torch.empty_like(gp), torch.empty_like(z), z.new_empty(B, C)
    if B * C:
        _block_double_backward_kernel[(B * C,)](
            u, u_sum_gn_xhat, u_sum_gn, gp, z, gamma, beta, mean, rstd, d_gp, d_z, d_gamma, C, H, W, **_blocks(H, W)
        )
    return d_gp, d_z, d_gamma
